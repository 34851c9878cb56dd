"""LoKr: W += kron(w1, w2) * scale, each side either full or a low-rank pair (w2 optionally Tucker)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, AdapterError, amax
from .loha import unflatten_conv
from .lora import rebuild_tucker


class LoKr(Adapter):
    algo = "lokr"
    # Each side is either full (lokr_wN) or factorised (lokr_wN_a, lokr_wN_b), so ``claims`` is custom.
    required = ()
    optional = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        # Claim any LoKr tensor so an incomplete group gets a precise error from validate().
        return bool(suffixes & set(cls.optional))

    def _factored(self, i: int) -> bool:
        # A full matrix wins over a stray pair, as in LyCORIS (use_w1/use_w2) and A1111.
        return f"lokr_w{i}" not in self.tensors

    def validate(self) -> None:
        ts, n = self.tensors, self.name
        for i in (1, 2):
            if self._factored(i) and not (f"lokr_w{i}_a" in ts and f"lokr_w{i}_b" in ts):
                raise AdapterError(f"{n}: LoKr needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b")
        if self._factored(1):
            a, b = ts["lokr_w1_a"], ts["lokr_w1_b"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise AdapterError(f"{n}: lokr_w1_a {tuple(a.shape)} and lokr_w1_b {tuple(b.shape)} do not chain")
        elif ts["lokr_w1"].dim() != 2:
            raise AdapterError(f"{n}: lokr_w1 must be 2-D, got {tuple(ts['lokr_w1'].shape)}")
        if not self._factored(2) and ts["lokr_w2"].dim() < 2:
            raise AdapterError(f"{n}: lokr_w2 must be at least 2-D, got {tuple(ts['lokr_w2'].shape)}")
        if "lokr_t2" in ts and not self._factored(2):
            raise AdapterError(f"{n}: lokr_t2 given with a full lokr_w2")
        if self._factored(2):
            a, b = ts["lokr_w2_a"], ts["lokr_w2_b"]
            t = ts.get("lokr_t2")
            if t is not None:  # t [r, r, *k], a [r, out], b [r, in]
                ok = (a.dim() == 2 and b.dim() == 2 and t.dim() == 4
                      and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0])
            else:  # a [out, r], b [r, in(*k)]
                ok = a.dim() == 2 and b.dim() >= 2 and a.shape[1] == b.shape[0]
            if not ok:
                extra = f", lokr_t2 {tuple(t.shape)}" if t is not None else ""
                raise AdapterError(f"{n}: lokr_w2_a {tuple(a.shape)} and lokr_w2_b {tuple(b.shape)}{extra} "
                                   "do not chain")

    def rank(self) -> int | None:
        # The b factors carry the rank in every layout ([r, ...]); with both sides full there is none.
        for i in (1, 2):
            if self._factored(i):
                return int(self.tensors[f"lokr_w{i}_b"].shape[0])
        return None

    def delta_bound(self) -> float:
        ts, bound = self.tensors, 1.0
        for i in (1, 2):
            if not self._factored(i):
                bound *= amax(ts[f"lokr_w{i}"])
                continue
            a, b, t = ts[f"lokr_w{i}_a"], ts[f"lokr_w{i}_b"], ts.get(f"lokr_t{i}")
            bound *= b.shape[0] * amax(a) * amax(b) * (t.shape[0] * amax(t) if t is not None else 1.0)
        return bound

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        dev = weight.device
        w1 = self.t("lokr_w1", dev) if not self._factored(1) else self.t("lokr_w1_a", dev) @ self.t("lokr_w1_b", dev)
        if not self._factored(2):
            w2 = self.t("lokr_w2", dev)
        elif "lokr_t2" in self.tensors:
            # LyCORIS: einsum("i j ..., i p, j r -> p r ...", t, w2_a, w2_b) with w2_a [r, out]
            w2 = rebuild_tucker(self.t("lokr_t2", dev), self.t("lokr_w2_a", dev).T, self.t("lokr_w2_b", dev))
        else:
            b = self.t("lokr_w2_b", dev)
            w2 = (self.t("lokr_w2_a", dev) @ b.flatten(1)).reshape(-1, *b.shape[1:])
        # LyCORIS forces alpha = rank when both sides are full, i.e. scale 1 whatever alpha says.
        rank = self.rank()
        scale = self.alpha / rank if self.alpha is not None and rank is not None else 1.0
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))  # w1 spans channels only; kernel dims come from w2
        return unflatten_conv(torch.kron(w1, w2.contiguous()) * scale, weight)  # kron rejects einsum's strides
