"""Tiny models wrapped as TrainableModel, and a tiny kohya dataset (test support)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib_lora.training.model import Conditioning, TrainableModel
from tiny_models import open_clip_forward, sdxl_y


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    # four blocks: the 8x downsampling every SD VAE has, at toy width
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()


def _tokens(captions: list[str]) -> torch.Tensor:
    import open_clip
    return open_clip.tokenize(captions)  # the real CLIP BPE, shipped inside open_clip


def trainable(tiny, vae=None, prediction: str = "epsilon", device: str = "cpu") -> TrainableModel:
    """``device``: where the tiny model, its encoders and the VAE already are."""
    vae = vae or tiny_vae()

    def encode_text(captions, sizes=None) -> Conditioning:
        tokens = _tokens(captions).to(device)
        if tiny.family == "sd1":
            return Conditioning(tiny.text_encoders[0][1](input_ids=tokens).last_hidden_state)
        if tiny.family == "sd2":
            out = open_clip_forward(tiny.text_encoders[0][1], tokens)
            return Conditioning(tiny.text_encoders[0][1].ln_final(out["hidden_states"][-2]))
        h1 = tiny.text_encoders[0][1](input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        out = open_clip_forward(tiny.text_encoders[1][1], tokens)
        sizes = sizes or [((64, 64), (0, 0), (64, 64))] * len(captions)
        ids = torch.tensor([[*o, *c, *t] for o, c, t in sizes], dtype=torch.float32, device=device)
        return Conditioning(torch.cat([h1, out["hidden_states"][-2]], -1), sdxl_y(out["text_embeds"], ids))

    def encode_images(pixels):
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mean * 0.18215

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0).float()
    def tokenize_word(word):
        from open_clip.tokenizer import _tokenizer
        return [_tokenizer.encode(word)] * len(tiny.text_encoders)

    return TrainableModel(tiny.family, tiny.unet, tiny.text_encoders, encode_text, encode_images, acp,
                          prediction=prediction, model_name=f"tiny-{tiny.family}", model_hash="0" * 64,
                          legacy_hash="00000000", resolution=64, device=torch.device(device),
                          tokenize_word=tokenize_word)


def make_dataset(root: Path, n: int = 4, repeats: int = 2, trigger: str = "zkx", seed: int = 0) -> Path:
    """Solid-ish coloured squares on grey: a concept a tiny random UNet can learn in a few steps."""
    rng = np.random.default_rng(seed)
    folder = root / f"{repeats}_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((64, 64, 3), 128, np.uint8)
        x, y = rng.integers(8, 24, 2)
        img[y:y + 32, x:x + 32] = (220, 40, 40)
        Image.fromarray(img).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"{trigger}, red square, grey background", encoding="utf-8")
    return root
