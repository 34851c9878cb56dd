"""The contract every weight-adapter algorithm (LoRA, LoHa, LoKr, ...) fulfils.

An adapter owns the tensors a file stores for one target module.  Each algorithm
implements one private computation, ``_delta``; the one public verb, ``add_delta_``,
adds the delta at a multiplier into a float32 tensor the caller passes (its device is
where the maths runs) and owns what all algorithms share: the multiplier, the shape
check, the DoRA strategy, the bias.  Deltas are taken against the *original* weight,
so several adapters on one module simply add up, and DoRA (which needs the original
weight) fits the same call.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, NamedTuple, Optional

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


class LowRankDelta(NamedTuple):
    """A delta kept as its factors, ``up @ down * scale``, so that it can be added by one fused matmul."""
    up: Tensor     # [out, r]
    down: Tensor   # [r, in * kernel]
    scale: float
    shape: tuple[int, ...]  # the delta's own shape (a conv kernel's dims included)

    def dense(self) -> Tensor:
        return (self.up @ self.down).reshape(self.shape) * self.scale


class Adapter:
    algo: ClassVar[str] = "base"
    # Suffixes (after the module key) that must all be present for this class to claim a group.
    required: ClassVar[tuple[str, ...]] = ()
    # Further suffixes it understands; anything else in the group is reported as unknown.
    optional: ClassVar[tuple[str, ...]] = ()
    # Whether the delta is proportional to the multiplier (all but the rotations, OFT and BOFT).
    linear: ClassVar[bool] = True
    # The stored bias delta's role, for the algorithms that have one (Full, Norm).
    bias_role: ClassVar[str | None] = None

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

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor | LowRankDelta:
        """The algorithm: this adapter's float32 delta against the original ``weight`` (float32, on the
        device the maths runs on; for an adapter that does not ``need_weight``, only its shape counts).

        At multiplier 1 for a ``linear`` class (``add_delta_`` scales it, or hands it to DoRA);
        at ``multiplier`` for one whose delta is not linear in it (OFT, BOFT).
        """
        raise NotImplementedError

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
        return self.bias_role is not None and self.bias_role in self.tensors

    def known_suffixes(self) -> set[str]:
        return set(self.required) | set(self.optional) | {"alpha", "dora_scale"}

    def t(self, key: str, device: torch.device | str) -> Tensor:
        """A stored tensor as float32 on ``device`` (the weight's: the caller says which, no state is kept)."""
        return self.tensors[key].to(device, torch.float32)

    def add_delta_(self, out: Tensor, original: Tensor | None, multiplier: float, *, part: str = "weight",
                   dyn: int | None = None, dora: Optional[DoraFn] = None) -> None:
        """``out += `` this adapter's delta at ``multiplier``, in place: the one delta verb.

        ``out`` is float32 and shaped like the layer's weight (``part="weight"``) or its bias
        (``"bias"``); its device is where the maths runs.  ``original`` is the weight before any
        merge (any dtype or device), read only when the adapter ``needs_weight`` (None otherwise).
        ``dora`` is the DoRA strategy for files with a magnitude vector (default: LyCORIS's).
        """
        if out.dtype != torch.float32:
            raise TypeError(f"{self.name}: deltas are added to a float32 tensor, got {out.dtype}")
        if part == "bias":
            if self.has_bias:
                out += fit_shape(self.t(self.bias_role, out.device), out.shape, self.name) * multiplier
            return
        if part != "weight":
            raise ValueError(f"unknown part {part!r}")
        if not self.needs_weight:
            w32 = out  # only its shape is read
        elif original is None:
            raise AdapterError(f"{self.name}: {self.algo} needs the original weight")
        else:
            w32 = original.to(out.device, torch.float32)
        dw = self._delta(w32, multiplier if not self.linear else 1.0, dyn)
        if self.dora_scale is None and not shape_fits(tuple(dw.shape), tuple(out.shape)):
            latent = latent_channels(out, tuple(dw.shape))
            out = out if latent is None else latent     # an inpainting model's conv_in: its latent channels
        if isinstance(dw, LowRankDelta):
            if not shape_fits(dw.shape, tuple(out.shape)):
                raise AdapterError(f"{self.name}: shape {dw.shape} does not fit layer weight {tuple(out.shape)}")
            if self.dora_scale is None and out.is_contiguous():
                # peft-style merge: one fused addmm into the destination, no delta tensor
                out.view(out.shape[0], -1).addmm_(dw.up, dw.down, alpha=multiplier * dw.scale)
                return
            dw = dw.dense()
        dw = fit_shape(dw, out.shape, self.name)
        if self.dora_scale is not None:
            out += (dora or dora_delta)(w32, dw, self.t("dora_scale", out.device), multiplier, self.name)
        else:
            out += dw * multiplier if self.linear else dw


def delta_tensor(adapter: Adapter, shape: tuple[int, ...] | torch.Size, multiplier: float, *,
                 original: Tensor | None = None, part: str = "weight", dyn: int | None = None,
                 dora: Optional[DoraFn] = None, device: torch.device | str = "cpu") -> Tensor:
    """The delta itself, as a float32 tensor of ``shape`` on ``device``: ``add_delta_`` into zeros,
    for callers that keep it apart from the weight (bypass hooks, the tools)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    adapter.add_delta_(out, original, multiplier, part=part, dyn=dyn, dora=dora)
    return out


def shape_fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Equal, or differing only by trailing 1-sized dims (1x1 conv <-> linear)."""
    if tuple(delta) == tuple(weight):
        return True
    squeeze = lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    return squeeze(delta) == squeeze(weight)


def latent_channels(out: Tensor, delta: tuple[int, ...]) -> Tensor | None:
    """The part of an inpainting (9 input channels) or instruct-pix2pix (8) model's ``conv_in`` weight that a
    delta made for the 4 latent channels covers: the latent comes first, and the mask and image channels
    take no delta, as the built-in Lora pads the delta with zeros.  None for any other pair of shapes."""
    if out.dim() == 4 and len(delta) == 4 and out.shape[1] in (8, 9) and delta[1] == 4 \
            and (delta[0], *delta[2:]) == (out.shape[0], *out.shape[2:]):
        return out[:, :4]
    return None


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
