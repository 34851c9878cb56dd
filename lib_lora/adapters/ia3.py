"""IA3: a learned per-channel scale, W += W * w on the output (default) or input channels."""
from __future__ import annotations

from torch import Tensor

from .base import Adapter, AdapterError


class IA3(Adapter):
    algo = "ia3"
    required = ("weight",)
    optional = ("on_input",)

    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        # "weight" is too generic a role: claim only a group that has nothing but IA3's own tensors.
        return "weight" in suffixes and suffixes <= {"weight", "on_input", "alpha"}

    @property
    def needs_weight(self) -> bool:
        return True

    def validate(self) -> None:
        w = self.tensors["weight"]
        if w.numel() == 0 or sum(d != 1 for d in w.shape) > 1:  # [n] (linear) or [1, n, 1, 1] (conv)
            raise AdapterError(f"{self.name}: IA3 weight must be a per-channel vector, got {tuple(w.shape)}")
        if "on_input" in self.tensors and self.tensors["on_input"].numel() != 1:
            raise AdapterError(f"{self.name}: IA3 on_input must be a scalar flag")

    def _on_input(self, weight: Tensor, n: int) -> bool:
        if "on_input" in self.tensors:
            return bool(self.tensors["on_input"].item())
        return n != weight.shape[0] and n == weight.shape[1]  # no flag: LyCORIS's default is output

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        vec = self.t("weight", weight.device).flatten()
        on_input = self._on_input(weight, vec.numel())
        axis = 1 if on_input else 0
        if weight.dim() < 2 or vec.numel() != weight.shape[axis]:
            side = "input" if on_input else "output"
            raise AdapterError(f"{self.name}: IA3 {side} scale of {vec.numel()} "
                               f"does not fit weight {tuple(weight.shape)}")
        shape = [1] * weight.dim()
        shape[axis] = -1
        return weight * vec.reshape(shape)  # the delta needs the original weight; alpha is unused by IA3
