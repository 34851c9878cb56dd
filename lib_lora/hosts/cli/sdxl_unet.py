"""SDXL's UNet (sgm ``UNetModel``) built from Stability-AI's ``ldm`` package.

The WebUI runs SDXL on ``sgm``, which is not on PyPI.  sgm's UNet differs from ldm's only in
ways that leave parameter names alone, so an ldm subclass can hold a real SDXL state dict:

- ``num_classes="sequential"``: ``label_emb = Sequential(Sequential(Linear(adm_in, ted), SiLU(),
  Linear(ted, ted)))`` -> names ``label_emb.0.0`` / ``label_emb.0.2`` as in SDXL files;
- per-level ``transformer_depth`` ([1, 2, 10] in sd_xl_base.yaml) and ``transformer_depth_middle``:
  ldm only takes one int, so we build every transformer at the deepest depth and drop the extra
  blocks (cheap on the meta device, where the checkpoint host builds);
- one context tensor shared by all blocks of a SpatialTransformer: ldm indexes ``context[i]``
  per block, so ``forward`` repeats a tensor context.

Needs ``ldm`` (``pip install --no-deps stable-diffusion-sdkit`` outside the WebUI).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample
from ldm.modules.diffusionmodules.util import linear


class SDXLUNetModel(UNetModel):
    """ldm ``UNetModel`` + sgm's sequential label embedding and per-level transformer depths."""

    def __init__(self, *, num_classes: str = "sequential", adm_in_channels: int,
                 transformer_depth: int | Sequence[int] = 1, transformer_depth_middle: int | None = None,
                 context_dim: int | Sequence[int], **kwargs: Any):
        if num_classes != "sequential":
            raise ValueError(f"SDXLUNetModel only supports num_classes='sequential', not {num_classes!r}")
        levels = len(kwargs.get("channel_mult", (1, 2, 4, 8)))
        depths = ([int(transformer_depth)] * levels if isinstance(transformer_depth, int)
                  else [int(d) for d in transformer_depth])
        if len(depths) != levels:
            raise ValueError(f"transformer_depth {list(depths)} needs one entry per level ({levels})")
        middle = depths[-1] if transformer_depth_middle is None else int(transformer_depth_middle)
        if not isinstance(context_dim, int):
            if len(set(context_dim)) != 1:
                raise ValueError(f"per-block context_dim {list(context_dim)} is not supported")
            context_dim = int(context_dim[0])
        self._depth = max(depths + [middle, 1])
        super().__init__(transformer_depth=self._depth, context_dim=[context_dim] * self._depth, **kwargs)
        self.transformer_depth = depths
        self.transformer_depth_middle = middle
        self._trim(depths, middle)

        ted = self.model_channels * 4
        self.num_classes = num_classes
        self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted)))
        # sgm registers label_emb right after time_embed; keep that order so state_dict order matches files.
        mods = list(self._modules.items())
        mods.insert(1 + [k for k, _ in mods].index("time_embed"), mods.pop())
        self._modules.clear()
        self._modules.update(mods)

    def _trim(self, depths: list[int], middle: int) -> None:
        def trim(block: nn.Module, depth: int) -> None:
            for m in block:
                if isinstance(m, SpatialTransformer):
                    del m.transformer_blocks[depth:]

        level = 0
        for block in list(self.input_blocks)[1:]:
            if isinstance(block[0], Downsample):
                level += 1
            trim(block, depths[level])
        trim(self.middle_block, middle)
        level = len(depths) - 1
        for block in self.output_blocks:
            trim(block, depths[level])
            if any(isinstance(m, Upsample) for m in block):
                level -= 1

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: Any = None,
                y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if isinstance(context, torch.Tensor):  # ldm's SpatialTransformer wants one context per block
            context = [context] * self._depth
        return super().forward(x, timesteps, context=context, y=y, **kwargs)
