"""LoHa: W += (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, optionally with Tucker cores for convs."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, AdapterError, amax
from .lora import rebuild_tucker


def unflatten_conv(delta: Tensor, weight: Tensor) -> Tensor:
    """LyCORIS stores non-Tucker conv factors flattened to [out, in*k*k]; restore the layer's shape."""
    if delta.dim() == 2 and weight.dim() > 2 and delta.shape[0] == weight.shape[0] \
            and delta.numel() == weight.numel():
        return delta.reshape(weight.shape)
    return delta  # anything else is left for fit_shape to accept or reject


class LoHa(Adapter):
    algo = "loha"
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional = ("hada_t1", "hada_t2")

    def validate(self) -> None:
        ts = self.tensors
        if ("hada_t1" in ts) != ("hada_t2" in ts):
            raise AdapterError(f"{self.name}: LoHa Tucker form needs both hada_t1 and hada_t2")
        shapes = [self._half_shape(i) for i in (1, 2)]
        if shapes[0] != shapes[1]:
            raise AdapterError(f"{self.name}: LoHa halves rebuild to {shapes[0]} and {shapes[1]}")

    def _half_shape(self, i: int) -> tuple[int, ...]:
        a, b = self.tensors[f"hada_w{i}_a"], self.tensors[f"hada_w{i}_b"]
        t = self.tensors.get(f"hada_t{i}")
        if t is not None:  # Tucker: t [r, r, *k], a [r, out], b [r, in]
            if a.dim() != 2 or b.dim() != 2 or t.dim() != 4 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                raise AdapterError(f"{self.name}: hada_t{i} {tuple(t.shape)} does not chain with "
                                   f"hada_w{i}_a {tuple(a.shape)} / hada_w{i}_b {tuple(b.shape)}")
            return (a.shape[1], b.shape[1], *t.shape[2:])
        if a.dim() < 2 or b.dim() < 2 or a.flatten(1).shape[1] != b.shape[0]:  # a [out, r], b [r, in*k*k]
            raise AdapterError(f"{self.name}: hada_w{i}_a {tuple(a.shape)} and "
                               f"hada_w{i}_b {tuple(b.shape)} do not chain")
        return (a.shape[0], b.flatten(1).shape[1])

    def rank(self) -> int:
        return int(self.tensors["hada_w1_b"].shape[0])  # [r, in] in both forms, as LyCORIS reads it

    def delta_bound(self) -> float:
        bound = 1.0
        for i in (1, 2):
            a, b, t = self.tensors[f"hada_w{i}_a"], self.tensors[f"hada_w{i}_b"], self.tensors.get(f"hada_t{i}")
            bound *= b.shape[0] * amax(a) * amax(b) * (t.shape[0] * amax(t) if t is not None else 1.0)
        return bound

    def _half(self, i: int, device: torch.device) -> Tensor:
        a, b = self.t(f"hada_w{i}_a", device), self.t(f"hada_w{i}_b", device)
        if f"hada_t{i}" in self.tensors:
            # LyCORIS: einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a): w_a is [r, out], so transpose
            return rebuild_tucker(self.t(f"hada_t{i}", device), a.T, b)
        return a.flatten(1) @ b.flatten(1)

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        # alpha/rank once: the scale LyCORIS's forward applies (its get_diff_weight applies it twice).
        scale = self.alpha / self.rank() if self.alpha is not None else 1.0
        return unflatten_conv(self._half(1, weight.device) * self._half(2, weight.device) * scale, weight)
