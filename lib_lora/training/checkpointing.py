"""Gradient checkpointing for LDM/SGM UNets that works with hooked-in LoRA modules.

ldm's own ``use_checkpoint`` passes only the block's registered parameters to its
reentrant checkpoint function, so gradients for LoRA modules attached by hooks would be
lost.  PyTorch's non-reentrant checkpoint recomputes the block's forward — hooks
included — and lets autograd find every parameter by itself.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint


def _blocks(unet: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(unet, "input_blocks", [])) + list(getattr(unet, "output_blocks", []))
    mid = getattr(unet, "middle_block", None)
    return blocks + ([mid] if mid is not None else [])


@contextmanager
def gradient_checkpointing(unet: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Recompute each UNet block in backward instead of keeping its activations; yields the block count."""
    blocks = [b for b in _blocks(unet) if "forward" not in vars(b)] if enabled else []
    for b in blocks:
        cls_forward = type(b).forward

        def forward(self, *args, _f=cls_forward, **kwargs):
            return checkpoint(_f, self, *args, use_reentrant=False, **kwargs)
        b.forward = types.MethodType(forward, b)
    try:
        yield len(blocks)
    finally:
        for b in blocks:
            del b.forward
