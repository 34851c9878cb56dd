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

    def weight_delta(self, weight: Tensor, dyn: int | None = None) -> Tensor:
        return self.t("w_norm", weight.device)

    @property
    def has_bias(self) -> bool:
        return "b_norm" in self.tensors

    def bias_delta(self, bias: Tensor | None) -> Tensor | None:
        return self.t("b_norm", bias.device if bias is not None else "cpu") if "b_norm" in self.tensors else None
