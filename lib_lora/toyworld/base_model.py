"""Recipe for the toy-world base model: a tiny SD1-layout checkpoint trained from scratch.

    python -m lib_lora.toyworld.base_model --out DIR [--minutes N] [--unet-steps S] [--seed S]
                                           [--vae-from CKPT] [--unet-from CKPT] [--finetune-decoder MINUTES]

Stages, all on CPU:
  a. VAE (time-boxed: ``vae_share`` of ``--minutes``): diffusers ``AutoencoderKL`` with 4 down blocks
     (8x: 64x64 RGB -> 8x8x4 latents), widths 32-64, trained on random 32x32 crops of BASE_WORLD images
     (4x cheaper than whole images; the network is fully convolutional) with MSE + L1 reconstruction +
     a small KL term.  ``--vae-from`` skips it and takes the VAE of an earlier run's checkpoint.
  a2. decoder fine-tune (``--finetune-decoder MINUTES``, ``vae_decoder.py``): only ``post_quant_conv``
     and the decoder train, on whole FULL_WORLD images (every shape incl. the star), so the VAE can
     draw what the base world never showed it; the encoder is frozen, so every latent stays
     bit-identical and stage a2 may run after stages b./c.
  b./c. text encoder + UNet trained *jointly* for ``unet_steps`` steps (batch 128; capped by
     ``unet_share`` of ``--minutes``): an HF ``CLIPTextModel`` (width 64, 3 layers) and the exact SD1.5
     ldm ``UNetModel`` layout (4 levels, channel_mult 1-2-4-4, attention on the first three, transformer
     depth 1, 2 res blocks per level) at model_channels 32, epsilon objective on the SD1 "linear"
     schedule with min-SNR-5 weighting, BASE_WORLD latents with their captions, 10% of captions dropped
     to "" for CFG, warm-up then cosine to 10% of the learning rate, fused AdamW.
     EMA weights (decay ramping to 0.999) are what gets saved.  ``--unet-from`` skips them and takes
     the UNet, text encoder and latent scale of an earlier checkpoint.
  d. ``save_checkpoint`` (fp16, + WebUI yaml) as ``DIR/toy-sd1.safetensors`` plus ``DIR/toy-sd1.json``
     with the settings and the measured numbers (VAE reconstruction error, the scorer's reading of
     VAE round trips per world before and after stage a2, the scorer's reading of generations for
     BASE_WORLD prompts, file size, minutes per stage).

Joint text-encoder training is cheap here (77 tokens x width 64) and gives a text encoder whose token
embeddings mean something, so a LoRA on it behaves like one on a real SD1 text encoder; the trigger
words (zkx, qwv) never occur in training captions, so their embeddings stay at their random init.

The committed asset was built run by run: stage a, then stages b./c. with ``--vae-from``, then stage
a2 alone, twice (the second continuing the first), with ``--vae-from`` and ``--unet-from`` both naming
the previous asset, so its UNet, text encoder and encoder are byte for byte the previous ones.
Its settings and measured numbers are in assets/toy-sd1.json and the README's toy-world section.

Everything is seeded; the VAE stage is time-boxed, so its step count (recorded in the JSON) varies with
the machine: two runs are comparable, not bit-identical.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .vae_decoder import finetune_decoder, hit_rates, log, pixels, to_pil
from .world import BASE_WORLD, generate

ASSETS = Path(__file__).parent / "assets"
DEFAULT_PATH = ASSETS / "toy-sd1.safetensors"

SETTINGS: dict[str, Any] = dict(
    seed=0,
    # VAE
    vae_channels=[32, 32, 64, 64], vae_layers_per_block=1, vae_images=4000, vae_batch=16, vae_crop=32, vae_lr=2e-3,
    vae_kl_weight=1e-5, vae_share=0.13, vae_eval_images=256,
    # decoder fine-tune (stage a2): whole FULL_WORLD images, encoder frozen
    dec_images=4000, dec_batch=16, dec_lr=1e-3, dec_final_lr=0.1,
    # text encoder
    te_width=64, te_layers=3, te_heads=2, te_lr=5e-4,
    # UNet
    unet_channels=32, unet_heads=2, unet_images=8000, unet_batch=128, unet_lr=1e-3, unet_warmup=200, unet_steps=3600,
    unet_final_lr=0.1, caption_dropout=0.1, min_snr_gamma=5.0, ema_decay=0.999, unet_share=0.8,
    # evaluation
    eval_prompts=60, eval_seed=1000, eval_steps=20, eval_cfg=5.0,
)


def build_vae(s: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(s["vae_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=tuple(s["vae_channels"]),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=s["vae_layers_per_block"], latent_channels=4, sample_size=64)


def build_text_encoder(s: dict[str, Any]) -> nn.Module:
    import transformers

    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=s["te_width"], intermediate_size=4 * s["te_width"],
        num_hidden_layers=s["te_layers"], num_attention_heads=s["te_heads"], max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=s["te_width"], bos_token_id=0, eos_token_id=2, pad_token_id=1,
        attn_implementation="sdpa")
    return transformers.CLIPTextModel(cfg)


def build_unet(s: dict[str, Any]) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=s["unet_channels"],
                     num_res_blocks=2, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                     num_heads=s["unet_heads"], use_spatial_transformer=True, transformer_depth=1,
                     context_dim=s["te_width"], use_checkpoint=False, legacy=False)


# ---------------------------------------------------------------------------------------------
# a. VAE


def train_vae(s: dict[str, Any], seconds: float) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(s["seed"])
    vae = build_vae(s).train()
    data = pixels([im for im, _, _ in generate(s["vae_images"], s["seed"] + 1, BASE_WORLD)])
    held = pixels([im for im, _, _ in generate(s["vae_eval_images"], s["seed"] + 2, BASE_WORLD)])
    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(s["seed"] + 3)
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < seconds:
        x = data[torch.randint(len(data), (s["vae_batch"],), generator=g)]
        c = s["vae_crop"]
        if c < x.shape[-1]:  # the VAE is fully convolutional: crops train it at a fraction of the cost
            oy, ox = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,), generator=g))
            x = x[..., oy:oy + c, ox:ox + c]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()  # summed over latent elements, mean over batch
        loss = mse + F.l1_loss(rec, x) + s["vae_kl_weight"] * kl  # L1 sharpens flat colours and edges
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} mse {np.mean(losses[-50:]):.4f} kl {kl.item():.1f}")
    vae.eval()
    with torch.no_grad():
        post = vae.encode(held).latent_dist
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        mse = F.mse_loss(rec, held).item()
        mae255 = ((rec - held).abs().mean() * 127.5).item()
    # what the scorer reads back from reconstructions: the VAE's own ceiling on generation accuracy
    from .scorer import score
    scenes = [sc for _, _, sc in generate(s["vae_eval_images"], s["seed"] + 2, BASE_WORLD)]
    imgs = to_pil(rec)
    hits = [score(im).matches(sc) for im, sc in zip(imgs, scenes)]
    stats = dict(steps=step, seconds=round(time.time() - t0, 1), train_mse_last50=float(np.mean(losses[-50:])),
                 heldout_mse=mse, heldout_mae_0_255=mae255, heldout_kl=float(post.kl().mean()),
                 recon_scorer=hit_rates(hits))
    log(f"vae done: {stats}")
    return vae.requires_grad_(False), stats


# ---------------------------------------------------------------------------------------------
# b./c. text encoder + UNet


def train_unet(s: dict[str, Any], vae: nn.Module, seconds: float) -> tuple[nn.Module, nn.Module, float, dict]:
    from ..hosts.cli.attention import sdpa_attention
    from ..hosts.cli.sampling import alphas_cumprod
    from ..hosts.cli.tokenizer import EOS, clip_tokenize

    torch.manual_seed(s["seed"] + 10)
    samples = generate(s["unet_images"], s["seed"] + 11, BASE_WORLD)
    pix = pixels([im for im, _, _ in samples])
    captions = [c for _, c, _ in samples]
    with torch.no_grad():
        dists = [vae.encode(pix[i:i + 256]).latent_dist for i in range(0, len(pix), 256)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    del pix
    g = torch.Generator().manual_seed(s["seed"] + 12)
    scale = float(1.0 / (mean + std * torch.randn(mean.shape, generator=g)).std())
    vocab = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(vocab)}
    cap_idx = torch.tensor([index[c] for c in captions])
    tokens = clip_tokenize(vocab, EOS)
    empty = len(vocab) - 1

    te = build_text_encoder(s).train()
    unet = build_unet(s).train()
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    for m in (ema_te, ema_unet):
        m.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": s["unet_lr"]},
                             {"params": te.parameters(), "lr": s["te_lr"]}], weight_decay=0.01, fused=True)
    base_lrs = [s["unet_lr"], s["te_lr"]]
    acp = alphas_cumprod()
    t0, step, losses = time.time(), 0, []
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    with sdpa_attention(unet):
        while time.time() - t0 < seconds and (not s["unet_steps"] or step < s["unet_steps"]):
            b = s["unet_batch"]
            idx = torch.randint(len(mean), (b,), generator=g)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
            ci = cap_idx[idx].clone()
            ci[torch.rand(b, generator=g) < s["caption_dropout"]] = empty
            uniq, inv = torch.unique(ci, return_inverse=True)
            ctx = te(input_ids=tokens[uniq]).last_hidden_state[inv]
            t = torch.randint(0, len(acp), (b,), generator=g)
            noise = torch.randn(z.shape, generator=g)
            a = acp[t].view(-1, 1, 1, 1)
            x = a.sqrt() * z + (1 - a).sqrt() * noise
            pred = unet(x, t, context=ctx)
            snr = (a / (1 - a)).flatten()
            w = snr.clamp(max=s["min_snr_gamma"]) / snr  # min-SNR-gamma weighting: faster convergence
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
            # warm-up, then a cosine down to unet_final_lr over the steps (or, time-boxed with
            # unet_steps=0, over the time budget: the step count is then unknown in advance)
            progress = step / s["unet_steps"] if s["unet_steps"] else min(1.0, (time.time() - t0) / seconds)
            cosine = s["unet_final_lr"] + (1 - s["unet_final_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))
            factor = min(1.0, (step + 1) / s["unet_warmup"]) * cosine
            for grp, lr in zip(opt.param_groups, base_lrs):
                grp["lr"] = lr * factor
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(s["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                log(f"unet step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f}s)")
    stats = dict(steps=step, seconds=round(time.time() - t0, 1), loss_last100=float(np.mean(losses[-100:])),
                 scale_factor=scale, unique_captions=len(vocab) - 1)
    log(f"unet done: {stats}")
    return ema_unet, ema_te, scale, stats


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(checkpoint, n: int = 60, seed: int = 1000, steps: int = 20, cfg: float = 5.0,
             batch: int = 20) -> dict[str, Any]:
    """Generate one image per BASE_WORLD prompt (``generate(n, seed)``'s captions, image i with noise
    seed ``seed + i``) and score it; the fraction whose shape / colour / background the scorer reads
    as prompted."""
    from ..hosts.cli.attention import sdpa_attention
    from ..hosts.cli.sampling import sample
    from .scorer import score

    prompts = generate(n, seed, BASE_WORLD)
    hits, images = [], []
    with sdpa_attention(checkpoint.unet):
        for i in range(0, n, batch):
            chunk = prompts[i:i + batch]
            imgs = sample(checkpoint, [c for _, c, _ in chunk], steps=steps, cfg=cfg, seed=seed + i,
                          width=64, height=64)
            images += imgs
            hits += [score(im).matches(sc) for im, (_, _, sc) in zip(imgs, chunk)]
    return {"n": n, "seed": seed, "steps": steps, "cfg": cfg, **hit_rates(hits), "images": images}


def build_checkpoint(unet, te, vae, scale: float):
    from ..hosts.cli.checkpoint import Checkpoint

    return Checkpoint.from_modules("sd1", unet.eval(), [("te", te.eval())], vae.eval(), prediction="epsilon",
                                   scale_factor=scale, resolution=64)


def contact_sheet(images, cols: int = 10):
    from PIL import Image

    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * 64, rows * 64), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * 64, (i // cols) * 64))
    return sheet


def _record_of(checkpoint: Path) -> dict[str, Any]:
    old = Path(checkpoint).with_suffix(".json")
    return json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}


def run(out: Path, minutes: float = 75.0, settings: dict[str, Any] | None = None, name: str = "toy-sd1",
        overwrite: bool = True, vae_from: Path | None = None, unet_from: Path | None = None,
        decoder_minutes: float = 0.0) -> dict[str, Any]:
    """The whole recipe; returns the record written to ``out/<name>.json``.

    ``vae_from`` / ``unet_from`` take stage a / stages b-c from an earlier checkpoint (the same one
    for both keeps every latent and weight of it); ``decoder_minutes`` adds stage a2."""
    from ..hosts.cli.checkpoint import load_checkpoint, save_checkpoint

    s = dict(SETTINGS, **(settings or {}))
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    budget = minutes * 60
    if vae_from is not None:   # stage a. done before: take the VAE (and its record) from that checkpoint
        vae = load_checkpoint(vae_from).vae.requires_grad_(False)
        vae_stats = {**_record_of(vae_from).get("vae", {}), "reused_from": Path(vae_from).name}
    else:
        vae, vae_stats = train_vae(s, budget * s["vae_share"])
    dec_stats: dict[str, Any] = {}
    if unet_from is not None:  # stages b./c. done before (their latents come from the same frozen encoder)
        prev = load_checkpoint(unet_from)
        unet, te, scale = prev.unet, prev.text_encoders[0][1], prev.scale_factor
        unet_stats = {**_record_of(unet_from).get("unet", {}), "reused_from": Path(unet_from).name}
        if vae_from is not None:
            dec_stats = _record_of(vae_from).get("decoder", {})
    else:
        unet, te, scale, unet_stats = train_unet(s, vae, budget * s["unet_share"])
    if decoder_minutes:        # stage a2: needs only the frozen encoder, so it may follow the UNet
        prior = dec_stats
        vae, dec_stats = finetune_decoder(s, vae, decoder_minutes * 60)
        if prior:              # a continuation of an earlier stage a2: keep its record too
            dec_stats["continues"] = prior
    ck = build_checkpoint(unet, te, vae, scale)
    path = save_checkpoint(ck, out / f"{name}.safetensors", dtype=torch.float16, yaml=True, overwrite=overwrite)
    size = path.stat().st_size
    # evaluate what was saved (fp16 weights, loaded back as fp32 the way the demo loads them)
    ev: dict[str, Any] = {"n": 0}
    if s["eval_prompts"]:
        loaded = load_checkpoint(path)
        ev = evaluate(loaded, s["eval_prompts"], s["eval_seed"], s["eval_steps"], s["eval_cfg"])
        contact_sheet(ev.pop("images")).save(out / f"{name}-eval.png")
    record = {
        "recipe": "python -m lib_lora.toyworld.base_model", "minutes_budget": minutes, "settings": s,
        "params": {"unet": sum(p.numel() for p in unet.parameters()),
                   "text_encoder": sum(p.numel() for p in te.parameters()),
                   "vae": sum(p.numel() for p in vae.parameters())},
        "vae": vae_stats, "decoder": dec_stats, "unet": unet_stats, "eval": ev, "file_bytes": size,
        "total_minutes": round((time.time() - start) / 60, 2), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    log(f"saved {path} ({size / 1e6:.1f} MB); eval {ev}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_lora.toyworld.base_model", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--minutes", type=float, default=75.0, help="total wall-clock budget for training")
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"])
    ap.add_argument("--name", default="toy-sd1")
    ap.add_argument("--unet-steps", type=int, default=SETTINGS["unet_steps"],
                    help="UNet/text-encoder steps (0: use the time budget instead)")
    ap.add_argument("--vae-from", type=Path, help="skip stage a: reuse the VAE of this toy checkpoint")
    ap.add_argument("--unet-from", type=Path,
                    help="skip stages b./c.: reuse the UNet and text encoder of this toy checkpoint")
    ap.add_argument("--finetune-decoder", type=float, default=0.0, metavar="MINUTES",
                    help="stage a2: fine-tune only the VAE decoder on FULL_WORLD images for MINUTES")
    a = ap.parse_args(argv)
    run(a.out, a.minutes, {"seed": a.seed, "unet_steps": a.unet_steps}, a.name, vae_from=a.vae_from,
        unet_from=a.unet_from, decoder_minutes=a.finetune_decoder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
