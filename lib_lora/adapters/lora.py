"""LoRA and LoCon: W += up @ down * alpha / rank, with an optional CP core for convs."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, AdapterError, shape_fits


def rebuild_tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Contract a CP/Tucker core [r, r, k, k] with [out, r] and [r, in] factors."""
    return torch.einsum("ijkl,jr,pi->prkl", core, right, left)


class LoRA(Adapter):
    algo = "lora"
    required = ("lora_down.weight", "lora_up.weight")
    optional = ("lora_mid.weight",)

    def validate(self) -> None:
        down, up = self.tensors["lora_down.weight"], self.tensors["lora_up.weight"]
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
            raise AdapterError(f"{self.name}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not chain")

    def rank(self) -> int:
        return int(self.tensors["lora_down.weight"].shape[0])

    def _factors(self, dyn: int | None) -> tuple[Tensor, Tensor, Tensor | None, float]:
        down, up = self.t("lora_down.weight"), self.t("lora_up.weight")
        mid = self.t("lora_mid.weight") if "lora_mid.weight" in self.tensors else None
        rank = down.shape[0]
        # dyn keeps the leading ranks of a DyLoRA at the scale the whole network was trained with.
        scale = self.alpha / rank if self.alpha is not None else 1.0
        if dyn is not None and 0 < dyn < rank:
            down, up = down[:dyn], up[:, :dyn]
            mid = mid[:dyn, :dyn] if mid is not None else None
        return down, up, mid, scale

    def add_weight_delta_(self, dst: Tensor, weight: Tensor, multiplier: float, dyn: int | None = None) -> None:
        # Fast path (peft-style merge): one fused addmm into the destination, no delta tensor.
        if self.dora_scale is not None or "lora_mid.weight" in self.tensors or not dst.is_contiguous():
            return super().add_weight_delta_(dst, weight, multiplier, dyn)
        self._device = dst.device
        down, up, _, scale = self._factors(dyn)
        if not shape_fits((up.shape[0], *down.shape[1:]), tuple(dst.shape)):
            raise AdapterError(f"{self.name}: shape {(up.shape[0], *down.shape[1:])} does not fit layer "
                               f"weight {tuple(dst.shape)}")
        dst.view(dst.shape[0], -1).addmm_(up.flatten(1), down.flatten(1), alpha=multiplier * scale)

    def weight_delta(self, weight: Tensor, dyn: int | None = None) -> Tensor:
        down, up, mid, scale = self._factors(dyn)
        if mid is not None:
            delta = rebuild_tucker(mid, up.flatten(1), down.flatten(1))
        elif down.dim() == 4 and down.shape[2:] != (1, 1):
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            delta = up.flatten(1) @ down.flatten(1)  # 1x1 convs are reshaped by the caller
        return delta * scale
