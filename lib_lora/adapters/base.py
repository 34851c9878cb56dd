"""The contract every weight-adapter algorithm (LoRA, LoHa, LoKr, ...) fulfils.

An adapter owns the tensors a file stores for one target module and turns them
into a weight delta.  Deltas are computed in float32 against the *original*
weight, so several adapters on one module simply add up, and DoRA (which needs
the original weight) fits the same shape of call.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

# how a DoRA magnitude turns a delta into the final change (adapters/dora.py holds the choices)
DoraFn = Callable[[Tensor, Tensor, Tensor, float, str], Tensor]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def amax(t: Tensor) -> float:
    """Largest magnitude in a stored tensor (any float dtype, float8 included)."""
    return float(t.float().abs().max()) if t.numel() else 0.0


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
        if alpha is not None and alpha.numel() != 1:
            raise AdapterError(f"{name}: alpha must be one number, got shape {tuple(alpha.shape)}")
        self.alpha: float | None = float(alpha.float().item()) if alpha is not None else None
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise AdapterError(f"{name}: alpha is {self.alpha}")
        self.dora_scale: Tensor | None = tensors.get("dora_scale")
        if self.dora_scale is not None and self.dora_scale.dim() == 0:
            raise AdapterError(f"{name}: dora_scale must be a per-channel vector, got a scalar")
        self.validate()
        self._check_scale()
        for role, t in tensors.items():
            if t.numel() == 0:
                raise AdapterError(f"{name}: {role} is empty (shape {tuple(t.shape)})")

    # -- things a subclass provides -------------------------------------------------
    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        return bool(cls.required) and set(cls.required) <= suffixes

    @classmethod
    def claims_group(cls, tensors: Dict[str, Tensor]) -> bool:
        """Whether this class takes the group; by its suffixes unless shapes decide (OFT vs BOFT)."""
        return cls.claims(set(tensors))

    def validate(self) -> None:
        """Raise AdapterError when the stored shapes cannot form a delta."""

    def rank(self) -> int | None:
        return None

    def delta_bound(self) -> float | None:
        """An upper bound of the delta's entries before the alpha/rank scale (None: not known)."""
        return None

    def weight_delta(self, weight: Tensor, dyn: int | None = None) -> Tensor | None:
        """float32 delta for multiplier 1, shaped like ``weight`` (or reshapeable to it)."""
        return None

    def bias_delta(self, bias: Tensor | None) -> Tensor | None:
        """float32 bias delta for multiplier 1, on ``bias``'s device (the CPU when the layer has none)."""
        return None

    # -- shared behaviour ------------------------------------------------------------
    def _check_scale(self) -> None:
        """Rank 0 has no scale, and a scale that overflows float32 would merge inf into the model."""
        rank = self.rank()
        if rank is None:
            return
        if rank <= 0:
            raise AdapterError(f"{self.name}: rank {rank}")
        scale = self.alpha / rank if self.alpha is not None else 1.0
        bound = self.delta_bound()
        peak = abs(scale) * (bound if bound is not None else 1.0)
        if not (abs(scale) <= FLOAT32_MAX and peak <= FLOAT32_MAX):
            raise AdapterError(f"{self.name}: alpha {self.alpha} / rank {rank} makes deltas "
                               "beyond the float32 range")

    @property
    def needs_weight(self) -> bool:
        """Whether the delta depends on the original weight (DoRA, IA3), not just the file."""
        return self.dora_scale is not None

    @property
    def has_bias(self) -> bool:
        """Whether this adapter changes the layer's bias (most only touch the weight)."""
        return False

    def known_suffixes(self) -> set[str]:
        return set(self.required) | set(self.optional) | {"alpha", "dora_scale"}

    def t(self, key: str, device: torch.device | str) -> Tensor:
        """A stored tensor as float32 on ``device`` (the weight's: the caller says which, no state is kept)."""
        return self.tensors[key].to(device, torch.float32)

    def weight_delta_at(self, weight: Tensor, multiplier: float, dyn: int | None = None,
                        dora: Optional[DoraFn] = None) -> Tensor | None:
        """float32 weight delta at ``multiplier`` against the original ``weight`` (any device).

        ``dora`` is the DoRA strategy for files with a magnitude vector (default: LyCORIS's).
        """
        w32 = weight.float()
        dw = self.weight_delta(w32, dyn)
        if dw is None:
            return None
        dw = fit_shape(dw, w32.shape, self.name)
        if self.dora_scale is not None:
            return (dora or dora_delta)(w32, dw, self.t("dora_scale", w32.device), multiplier, self.name)
        return dw * multiplier

    def bias_delta_at(self, bias: Tensor | None, multiplier: float) -> Tensor | None:
        db = self.bias_delta(bias)
        if db is None:
            return None
        if bias is None:
            raise AdapterError(f"{self.name}: file has a bias delta but the layer has no bias")
        return fit_shape(db.float(), bias.shape, self.name) * multiplier

    def add_weight_delta_(self, dst: Tensor, weight: Tensor, multiplier: float, dyn: int | None = None,
                          dora: Optional[DoraFn] = None) -> None:
        """dst += delta, in place (dst is float32 and shaped like ``weight``)."""
        dw = self.weight_delta_at(weight, multiplier, dyn, dora)
        if dw is not None:
            dst += dw

    def deltas(self, weight: Tensor, bias: Tensor | None, multiplier: float, dyn: int | None = None,
               dora: Optional[DoraFn] = None) -> tuple[Tensor | None, Tensor | None]:
        """(weight delta, bias delta) at ``multiplier``, float32, against the original weight."""
        return self.weight_delta_at(weight, multiplier, dyn, dora), self.bias_delta_at(bias, multiplier)


def shape_fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Equal, or differing only by trailing 1-sized dims (1x1 conv <-> linear)."""
    if tuple(delta) == tuple(weight):
        return True
    squeeze = lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    return squeeze(delta) == squeeze(weight)


def fit_shape(delta: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Accept only shapes that differ by trailing 1-sized dims (1x1 conv <-> linear)."""
    if delta.shape == shape:
        return delta
    if shape_fits(tuple(delta.shape), tuple(shape)):
        return delta.reshape(shape)
    raise AdapterError(f"{name}: shape {tuple(delta.shape)} does not fit layer weight {tuple(shape)}")


def dora_delta(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float, name: str) -> Tensor:
    """Weight-decomposed update (DoRA) as LyCORIS defines it, returned as a plain delta.

    The magnitude vector is normalised either per output channel (shape [out, 1, ...])
    or per input channel (shape [1, in, ...]); the stored shape says which.
    """
    merged = weight + delta
    shape, ones = tuple(dora_scale.shape), [1] * (weight.dim() - 1)
    # [out], [out, 1, ...] or [1, in, 1, ...], of any rank: brought to the weight's rank before any
    # arithmetic, so a conv-shaped magnitude on a linear layer cannot broadcast into a huge tensor
    if shape[0] == weight.shape[0] and all(d == 1 for d in shape[1:]):
        dora_scale = dora_scale.reshape(weight.shape[0], *ones)
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(dora_scale.shape)
    elif weight.dim() > 1 and len(shape) > 1 and shape[0] == 1 and shape[1] == weight.shape[1] \
            and all(d == 1 for d in shape[2:]):
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *[1] * (weight.dim() - 2))
        dora_scale = dora_scale.reshape(norm.shape)
    else:
        raise AdapterError(f"{name}: dora_scale shape {shape} does not fit weight {tuple(weight.shape)}")
    scale = dora_scale / (norm + torch.finfo(torch.float32).eps)
    scale = multiplier * (scale - 1) + 1
    return merged * scale - weight
