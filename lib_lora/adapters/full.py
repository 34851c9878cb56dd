"""Full: the file stores the whole weight difference (and optionally the bias difference)."""
from __future__ import annotations

from torch import Tensor

from .base import Adapter


class Full(Adapter):
    algo = "full"
    required = ("diff",)
    optional = ("diff_b",)

    def weight_delta(self, weight: Tensor, dyn: int | None = None) -> Tensor:
        return self.t("diff", weight.device)  # alpha is not part of LyCORIS's full algo; fit_shape checks the shape

    @property
    def has_bias(self) -> bool:
        return "diff_b" in self.tensors

    def bias_delta(self, bias: Tensor | None) -> Tensor | None:
        return self.t("diff_b", bias.device if bias is not None else "cpu") if "diff_b" in self.tensors else None
