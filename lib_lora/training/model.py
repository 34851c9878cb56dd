"""What the trainer needs from a host for one loaded model.

Hosts (the WebUI's loaded checkpoint, or a single-file checkpoint opened by the CLI)
build a ``TrainableModel`` around modules they already hold — nothing is copied or
reloaded.  The trainer only adds LoRA modules beside them and gives everything back
unchanged afterwards.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..modelmap import ModelMap

# per-image SDXL size conditioning: (original (h, w), crop top-left (y, x), target (h, w))
SizeCond = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class Conditioning:
    context: Tensor            # cross-attention input [B, 77*k, C]
    y: Tensor | None = None    # SDXL's vector conditioning (pooled text + size embeddings)


@dataclass
class TrainableModel:
    family: str                                        # "sd1" | "sd2" | "sdxl"
    unet: nn.Module                                    # LDM/SGM UNetModel: unet(x, t, context=..., y=...)
    text_encoders: list[tuple[str, nn.Module]]         # (kohya prefix, root) as ModelMap.build takes them
    encode_text: Callable[[list[str], list[SizeCond] | None], Conditioning]  # grads flow when TE trains
    encode_images: Callable[[Tensor], Tensor]          # pixels [-1, 1] -> latents already scaled
    alphas_cumprod: Tensor                             # [num_train_timesteps]
    prediction: str = "epsilon"                        # or "v"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_name: str = ""                               # checkpoint title, for ss_sd_model_name
    model_hash: str = ""                               # sha256 or the host's hash, for ss metadata
    legacy_hash: str = ""
    resolution: int = 512                              # the family's native training side
    model_map: ModelMap | None = None
    decode_latents: Callable[[Tensor], Tensor] | None = None   # for sample images
    render: Callable[..., list] | None = None          # host's own txt2img, for progress samples
    context: Callable[[], AbstractContextManager] | None = None  # entered for the run (e.g. fused attention)
    clip_skip: int | None = None                       # kohya's clip skip encode_text applies (None: 1)
    max_token_length: int | None = None                # kohya's caption limit encode_text applies (None: none)
    # a word's token ids per text encoder, as its prompts are tokenised (pivotal tuning); None: cannot say
    tokenize_word: Callable[[str], list[list[int]]] | None = None

    def __post_init__(self) -> None:
        if self.model_map is None:
            self.model_map = ModelMap.build(self.family, self.unet, self.text_encoders)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.y is not None:
            return self.unet(x, t, context=cond.context, y=cond.y)
        return self.unet(x, t, context=cond.context)
