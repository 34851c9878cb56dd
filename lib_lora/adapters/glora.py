"""GLoRA (LyCORIS): W += (W A + B) * alpha / rank, with A = a1 a2 acting on the input side.

Tensors as LyCORIS saves its nn.Linear/Conv pairs: ``a1.weight`` [in, r(, 1, 1)],
``a2.weight`` [r, in(, 1, 1)], ``b1.weight`` [out, r(, 1, 1)], ``b2.weight`` [r, in(, k, k)],
optionally ``bm.weight`` [r, r, k, k] (a Tucker core for B) and ``alpha``.  The delta depends on
the original weight.  This follows LyCORIS's own merge; the built-in Lora of WebUI 1.10.1
multiplies the factors in another order (``b2 @ b1 + W @ a2 @ a1``), which is not what was trained.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, AdapterError

_ROLES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class GLoRA(Adapter):
    algo = "glora"
    required = _ROLES
    optional = ("bm.weight",)

    @property
    def needs_weight(self) -> bool:
        return True

    def validate(self) -> None:
        ts, n = self.tensors, self.name
        a1, a2, b1, b2 = (ts[r] for r in _ROLES)
        if min(t.dim() for t in (a1, a2, b1, b2)) < 2:
            raise AdapterError(f"{n}: GLoRA factors must be at least 2-D")
        r = a2.shape[0]
        if a1.shape[1] != r or a1.shape[0] != a2.flatten(1).shape[1]:
            raise AdapterError(f"{n}: a1.weight {tuple(a1.shape)} and a2.weight {tuple(a2.shape)} do not chain")
        bm = ts.get("bm.weight")
        if bm is not None:
            if bm.dim() < 3 or bm.shape[0] != b1.shape[1] or bm.shape[1] != b2.shape[0]:
                raise AdapterError(f"{n}: bm.weight {tuple(bm.shape)} does not chain b1.weight {tuple(b1.shape)} "
                                   f"and b2.weight {tuple(b2.shape)}")
        elif b1.flatten(1).shape[1] != b2.shape[0]:
            raise AdapterError(f"{n}: b1.weight {tuple(b1.shape)} and b2.weight {tuple(b2.shape)} do not chain")

    def rank(self) -> int:
        return int(self.tensors["a2.weight"].shape[0])

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        dev = weight.device
        a = self.t("a1.weight", dev).flatten(1) @ self.t("a2.weight", dev).flatten(1)  # [in, in]
        if a.shape[0] != weight.shape[1]:
            raise AdapterError(f"{self.name}: GLoRA input side of {a.shape[0]} does not fit weight {tuple(weight.shape)}")
        wa = torch.einsum("oi...,ij->oj...", weight, a)
        b1, b2 = self.t("b1.weight", dev), self.t("b2.weight", dev)
        if "bm.weight" in self.tensors:
            wb = torch.einsum("mn...,im,nj->ij...", self.t("bm.weight", dev), b1.flatten(1), b2.flatten(1))
        else:
            wb = b1.flatten(1) @ b2.flatten(1)
        if wb.numel() != weight.numel():
            raise AdapterError(f"{self.name}: GLoRA B of shape {tuple(wb.shape)} does not fit weight {tuple(weight.shape)}")
        # LyCORIS: alpha missing or 0 means alpha = rank
        scale = self.alpha / self.rank() if self.alpha else 1.0
        return (wa + wb.reshape(weight.shape)) * scale
