"""LoRA and LoCon: W += up @ down * alpha / rank, with an optional CP core for convs."""
from __future__ import annotations

import torch
from torch import Tensor

from ..autocast import autocasting
from .base import Adapter, AdapterError, LowRankDelta, amax


def rebuild_tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Contract a CP/Tucker core [r, r, k, k] with [out, r] and [r, in] factors."""
    return torch.einsum("ijkl,jr,pi->prkl", core, right, left)


class LoRA(Adapter):
    algo = "lora"
    required = ("lora_down.weight", "lora_up.weight")
    optional = ("lora_mid.weight",)

    def validate(self) -> None:
        down, up = self.tensors["lora_down.weight"], self.tensors["lora_up.weight"]
        mid = self.tensors.get("lora_mid.weight")
        # up is [out, r] or a 1x1 conv [out, r, 1, 1]; down carries the kernel unless a mid core does
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            raise AdapterError(f"{self.name}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not chain")
        if mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (up.shape[1], down.shape[0])
                                or any(d != 1 for d in down.shape[2:])):
            raise AdapterError(f"{self.name}: lora_mid {tuple(mid.shape)} does not chain with lora_up "
                               f"{tuple(up.shape)} and lora_down {tuple(down.shape)}")
        dora = self.dora_scale
        if dora is not None and dora.numel() not in (up.shape[0], down.shape[1]):
            raise AdapterError(f"{self.name}: dora_scale {tuple(dora.shape)} fits neither the {up.shape[0]} outputs "
                               f"nor the {down.shape[1]} inputs")

    def rank(self) -> int:
        return int(self.tensors["lora_down.weight"].shape[0])

    def delta_bound(self) -> float:
        ts = self.tensors
        bound = self.rank() * amax(ts["lora_up.weight"]) * amax(ts["lora_down.weight"])
        if "lora_mid.weight" in ts:
            bound *= self.rank() * amax(ts["lora_mid.weight"])
        return bound

    def _factors(self, dyn: int | None, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor | None, float]:
        down, up = self.t("lora_down.weight", device), self.t("lora_up.weight", device)
        mid = self.t("lora_mid.weight", device) if "lora_mid.weight" in self.tensors else None
        rank = down.shape[0]
        # dyn keeps the leading ranks of a DyLoRA at the scale the whole network was trained with.
        scale = self.alpha / rank if self.alpha is not None else 1.0
        if dyn is not None and 0 < dyn < rank:
            down, up = down[:dyn], up[:, :dyn]
            mid = mid[:dyn, :dyn] if mid is not None else None
        return down, up, mid, scale

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor | LowRankDelta:
        down, up, mid, scale = self._factors(dyn, weight.device)
        if mid is not None:
            return rebuild_tucker(mid, up.flatten(1), down.flatten(1)) * scale
        # kept factored: the caller adds it with one fused matmul where it can
        return LowRankDelta(up.flatten(1), down.flatten(1), scale, (up.shape[0], *down.shape[1:]))


class LoRAModule(torch.nn.Module):
    """The trainable form of ``LoRA``: a down/up pair beside a frozen layer (peft's bypass path).

    For a conv layer the down projection copies the layer's kernel, stride and padding and
    the up projection is 1x1 (kohya's LoCon), so ``kohya_tensors()`` is exactly what ``LoRA``
    loads back.
    """

    def __init__(self, name: str, layer: torch.nn.Module, weight_shape: torch.Size, rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        self.name, self.rank, self.alpha = name, rank, float(alpha)
        out_f, in_f = weight_shape[0], weight_shape[1]
        if len(weight_shape) == 4 and isinstance(layer, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(in_f, rank, layer.kernel_size, layer.stride, layer.padding,
                                        layer.dilation, bias=False)
            self.up = torch.nn.Conv2d(rank, out_f, 1, bias=False)
        else:
            self.down = torch.nn.Linear(in_f, rank, bias=False)
            self.up = torch.nn.Linear(rank, out_f, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.up.weight)  # starts as an exact no-op
        self.dropout = dropout
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _rank_activations(self, x: Tensor) -> Tensor:
        # Under autocast the product takes x as it is: casting a half x to the fp32 LoRA weight
        # first would copy the layer-wide input twice (to fp32, and back for the matmul) and
        # keep the second copy for backward.  Outside autocast (fp32 training) no cast is needed.
        if x.dtype != self.down.weight.dtype and not autocasting(x.device.type):
            x = x.to(self.down.weight.dtype)
        h = self.down(x)
        if self.dropout > 0 and self.training:
            h = torch.nn.functional.dropout(h, self.dropout)  # kohya's network_dropout: on the rank dim
        # scaling the rank-wide tensor, not the layer-wide output, keeps a full-size mul out of
        # both forward and backward
        return h * (self.multiplier * self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """The LoRA branch alone: up(down(x)) * multiplier * alpha / rank."""
        return self.up(self._rank_activations(x))

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + self(x)`` for the frozen layer's output ``out``.

        For a Linear one GEMM writes ``out + h @ up.T``: the up projection's layer-wide result
        is never a tensor of its own, in forward or in backward.
        """
        h = self._rank_activations(x)
        if isinstance(self.up, torch.nn.Linear):
            w = self.up.weight.t().to(out.dtype)
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]).to(out.dtype), w) \
                .view(out.shape)
        return out + self.up(h).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """The weight change itself, for layers whose forward cannot be bypassed (fused attention)."""
        return (self.up.weight.flatten(1) @ self.down.weight.flatten(1)) * (self.multiplier * self.scale)

    def kohya_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        # copies: while training, the weights are views of one flat buffer (training/flat_params.py)
        return {"lora_down.weight": self.down.weight.detach().to(dtype, copy=True).contiguous(),
                "lora_up.weight": self.up.weight.detach().to(dtype, copy=True).contiguous(),
                "alpha": torch.tensor(self.alpha, dtype=dtype)}

    def load_kohya_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy back what ``kohya_tensors`` gave (down and up; alpha is the module's own)."""
        with torch.no_grad():
            self.down.weight.copy_(tensors["lora_down.weight"].reshape(self.down.weight.shape))
            self.up.weight.copy_(tensors["lora_up.weight"].reshape(self.up.weight.shape))
