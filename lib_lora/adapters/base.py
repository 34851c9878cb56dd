"""The contract every weight-adapter algorithm (LoRA, LoHa, LoKr, ...) fulfils.

An adapter owns the tensors a file stores for one target module and turns them
into a weight delta.  Deltas are computed in float32 against the *original*
weight, so several adapters on one module simply add up, and DoRA (which needs
the original weight) fits the same shape of call.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class AdapterError(ValueError):
    """The tensors of one module are inconsistent or do not fit the target."""


class Adapter:
    algo: ClassVar[str] = "base"
    # Suffixes (after the module key) that must all be present for this class to claim a group.
    required: ClassVar[tuple[str, ...]] = ()
    # Further suffixes it understands; anything else in the group is reported as unknown.
    optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, tensors: dict[str, Tensor]):
        self.name = name
        self.tensors = tensors
        alpha = tensors.get("alpha")
        self.alpha: float | None = float(alpha.float().item()) if alpha is not None else None
        self.dora_scale: Tensor | None = tensors.get("dora_scale")
        self.validate()

    # -- things a subclass provides -------------------------------------------------
    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        return bool(cls.required) and set(cls.required) <= suffixes

    def validate(self) -> None:
        """Raise AdapterError when the stored shapes cannot form a delta."""

    def rank(self) -> int | None:
        return None

    def weight_delta(self, weight: Tensor, dyn: int | None = None) -> Tensor | None:
        """float32 delta for multiplier 1, shaped like ``weight`` (or reshapeable to it)."""
        return None

    def bias_delta(self, bias: Tensor | None) -> Tensor | None:
        return None

    # -- shared behaviour ------------------------------------------------------------
    def known_suffixes(self) -> set[str]:
        return set(self.required) | set(self.optional) | {"alpha", "dora_scale"}

    def t(self, key: str) -> Tensor:
        return self.tensors[key].float()

    def deltas(self, weight: Tensor, bias: Tensor | None, multiplier: float,
               dyn: int | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(weight delta, bias delta) at ``multiplier``, float32, against the original weight."""
        w32 = weight.float()
        dw = self.weight_delta(w32, dyn)
        if dw is not None:
            dw = fit_shape(dw, w32.shape, self.name)
            if self.dora_scale is not None:
                dw = dora_delta(w32, dw, self.dora_scale.float(), multiplier, self.name)
            else:
                dw = dw * multiplier
        db = self.bias_delta(bias)
        if db is not None:
            if bias is None:
                raise AdapterError(f"{self.name}: file has a bias delta but the layer has no bias")
            db = fit_shape(db.float(), bias.shape, self.name) * multiplier
        return dw, db


def fit_shape(delta: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Accept only shapes that differ by trailing 1-sized dims (1x1 conv <-> linear)."""
    if delta.shape == shape:
        return delta
    squeeze = lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    if delta.numel() == int(torch.Size(shape).numel()) and squeeze(delta.shape) == squeeze(shape):
        return delta.reshape(shape)
    raise AdapterError(f"{name}: shape {tuple(delta.shape)} does not fit layer weight {tuple(shape)}")


def dora_delta(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float, name: str) -> Tensor:
    """Weight-decomposed update (DoRA) as LyCORIS defines it, returned as a plain delta.

    The magnitude vector is normalised either per output channel (shape [out, 1, ...])
    or per input channel (shape [1, in, ...]); the stored shape says which.
    """
    merged = weight + delta
    if dora_scale.dim() == 1:  # PEFT's lora_magnitude_vector: per output channel
        dora_scale = dora_scale.reshape(-1, *[1] * (weight.dim() - 1))
    if dora_scale.shape[0] == weight.shape[0] and dora_scale.numel() == weight.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(dora_scale.shape)
    elif weight.dim() > 1 and dora_scale.numel() == weight.shape[1]:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *[1] * (weight.dim() - 2))
        dora_scale = dora_scale.reshape(norm.shape)
    else:
        raise AdapterError(f"{name}: dora_scale shape {tuple(dora_scale.shape)} does not fit weight {tuple(weight.shape)}")
    scale = dora_scale / (norm + torch.finfo(torch.float32).eps)
    scale = multiplier * (scale - 1) + 1
    return merged * scale - weight
