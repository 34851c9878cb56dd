"""The float32 sum of the contributions to one weight, and the check before it is written.

Shared by the patcher (merging, and layers merged while a step range is open) and the bypass
(hooks pass the same check): a merged value must be finite and fit the layer's dtype, as peft's
safe merge demands, and a file whose maths fails on a layer is that file's own error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .adapters import Adapter, AdapterError

if TYPE_CHECKING:
    from .modelmap import Target

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch 2.1 has only the cuda one
# what a file whose tensors pass every check can still raise in its maths: that file's own error
MATH_ERRORS = (RuntimeError, ValueError, ArithmeticError, IndexError)


class Contribution(NamedTuple):
    """One adapter's share of one layer at its multiplier; ``network`` names its file in messages."""
    target: "Target"
    adapter: Adapter
    multiplier: float
    dyn: int | None
    network: str


def error_text(e: BaseException) -> str:
    if isinstance(e, AdapterError):
        return str(e)
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def fits_dtype(t: Tensor, dtype: torch.dtype) -> bool:
    """Every value of the float32 ``t`` is finite and stays finite when cast to ``dtype`` (peft's safe merge)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates into both
    limit = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    return bool(torch.isfinite(lo) and torch.isfinite(hi) and hi <= limit and lo >= -limit)


def overflowing(contribs: list[Contribution], base: Tensor, param: Tensor, pname: str, dora_fn) -> list[str]:
    """The networks whose contribution first makes the merge of one weight non-finite (only called on failure)."""
    merged = base.to(param.device, torch.float32, copy=True)
    original = merged.clone()
    culprits: list[str] = []
    for c in contribs:
        before = merged.clone()
        try:
            add_contribution(merged, original, c, pname, dora_fn)
        except (AdapterError,) + MATH_ERRORS:
            merged = before  # reported by the merge itself
            continue
        if not fits_dtype(merged, param.dtype):
            culprits.append(c.network)
            merged = before
    return culprits or [c.network for c in contribs]


def add_contribution(merged: Tensor, original: Tensor | None, c: Contribution, pname: str, dora_fn) -> None:
    """Add ``c``'s delta to the float32 value of ``pname`` (to its rows, on a fused layer)."""
    rows = c.target.rows
    if rows is not None:
        merged, original = merged[rows], original[rows] if original is not None else None
    part = "weight" if pname == c.target.weight_name else "bias"
    c.adapter.add_delta_(merged, original, c.multiplier, part=part, dyn=c.dyn, dora=dora_fn)


def original_for(merged: Tensor, contribs: list[Contribution]) -> Tensor | None:
    """A copy of the unmerged value where some delta scales the weight itself (it must see the
    original, not earlier adapters' sum)."""
    return merged.clone() if any(c.adapter.needs_weight for c in contribs) else None


def sum_into(merged: Tensor, original: Tensor | None, contribs: list[Contribution], pname: str, dora_fn,
              bad: dict[str, list[str]], failed: set, k: tuple[int, str]) -> None:
    """Add every contribution's delta for ``pname`` to the float32 ``merged``; one that raises is
    recorded in ``bad``/``failed`` and the rest still add."""
    for c in contribs:
        try:
            add_contribution(merged, original, c, pname, dora_fn)  # original: None unless some delta reads it
        except OOM:
            raise
        except (AdapterError,) + MATH_ERRORS as e:
            bad.setdefault(c.network, []).append(error_text(e))
            failed.add((k, id(c.adapter)))


def precise_source(module: torch.nn.Module, pname: str, param: Tensor) -> Tensor | None:
    """A higher-precision copy of an 8-bit float weight to merge from, where the host keeps one: the WebUI's
    "Cache FP16 weight for LoRA" leaves ``fp16_weight``/``fp16_bias`` on each layer it stores in fp8, and its
    built-in Lora merges from them (the fp8 value is still what a restore writes back)."""
    if param.element_size() != 1 or not param.dtype.is_floating_point:
        return None
    copy = getattr(module, f"fp16_{pname}", None)
    return copy if isinstance(copy, Tensor) and copy.shape == param.shape else None
