"""Norm: additive deltas for a LayerNorm/GroupNorm affine weight and bias."""
from __future__ import annotations

from torch import Tensor

from .base import Adapter, AdapterError


class Norm(Adapter):
    algo = "norm"
    required = ("w_norm",)
    optional = ("b_norm",)

    def validate(self) -> None:
        for key in ("w_norm", "b_norm"):
            t = self.tensors.get(key)
            if t is not None and t.dim() != 1:
                raise AdapterError(f"{self.name}: {key} must be 1-D, got {tuple(t.shape)}")

    bias_role = "b_norm"

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        return self.t("w_norm", weight.device)
