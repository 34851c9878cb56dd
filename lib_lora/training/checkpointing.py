"""Gradient checkpointing for LDM/SGM UNets that works with hooked-in LoRA modules.

ldm's own ``use_checkpoint`` passes only the block's registered parameters to its
reentrant checkpoint function, so gradients for LoRA modules attached by hooks would be
lost.  PyTorch's non-reentrant checkpoint recomputes the block's forward — hooks
included — and lets autograd find every parameter by itself.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..instance_forward import instance_forward


def _blocks(unet: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(unet, "input_blocks", [])) + list(getattr(unet, "output_blocks", []))
    mid = getattr(unet, "middle_block", None)
    return blocks + ([mid] if mid is not None else [])


def _checkpointed(self, *args, **kwargs):
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def gradient_checkpointing(unet: nn.Module, enabled: bool = True) -> AbstractContextManager[int]:
    """Recompute each UNet block in backward instead of keeping its activations; yields the block count."""
    return instance_forward(_blocks(unet) if enabled else [], _checkpointed)
