"""Adapter registry: which algorithm claims a group of tensors.

Each algorithm lives in its own module with one class; add new ones to ``ALGORITHMS``.
Order matters only where required suffixes overlap (more specific first).
"""
from __future__ import annotations

from torch import Tensor

from .base import Adapter, AdapterError
from .boft import BOFT
from .diag_oft import DiagOFT
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm

# BOFT before DiagOFT: both store oft_blocks, BOFT's are 4-D
ALGORITHMS: list[type[Adapter]] = [LoRA, LoHa, LoKr, IA3, Full, Norm, BOFT, DiagOFT, GLoRA]


def make_adapter(name: str, tensors: dict[str, Tensor]) -> Adapter:
    """Build the adapter for one module's tensors; AdapterError if nothing claims them."""
    for cls in ALGORITHMS:
        if cls.claims_group(tensors):
            return cls(name, tensors)
    raise AdapterError(f"{name}: unrecognised tensor set {sorted(tensors)}")


__all__ = ["Adapter", "AdapterError", "ALGORITHMS", "make_adapter"]
