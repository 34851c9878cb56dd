"""Full: the file stores the whole weight difference (and optionally the bias difference)."""
from __future__ import annotations

from torch import Tensor

from .base import Adapter


class Full(Adapter):
    algo = "full"
    required = ("diff",)
    optional = ("diff_b",)

    bias_role = "diff_b"

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        return self.t("diff", weight.device)  # alpha is not part of LyCORIS's full algo; fit_shape checks the shape
