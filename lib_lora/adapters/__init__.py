"""Adapter registry: which algorithm claims a group of tensors.

Each algorithm lives in its own module with one class; add new ones to ``ALGORITHMS``.
Order matters only where required suffixes overlap (more specific first).
"""
from __future__ import annotations

from torch import Tensor

from .base import Adapter, AdapterError
from .lora import LoRA

ALGORITHMS: list[type[Adapter]] = [LoRA]

try:  # the LyCORIS family registers itself here once its modules exist
    from .loha import LoHa
    from .lokr import LoKr
    from .ia3 import IA3
    from .full import Full
    from .norm import Norm
    ALGORITHMS = [LoRA, LoHa, LoKr, IA3, Full, Norm]
except ImportError:  # pragma: no cover - during bring-up only
    pass


def make_adapter(name: str, tensors: dict[str, Tensor]) -> Adapter:
    """Build the adapter for one module's tensors; AdapterError if nothing claims them."""
    suffixes = set(tensors)
    for cls in ALGORITHMS:
        if cls.claims(suffixes):
            return cls(name, tensors)
    raise AdapterError(f"{name}: unrecognised tensor set {sorted(suffixes)}")


__all__ = ["Adapter", "AdapterError", "ALGORITHMS", "make_adapter"]
