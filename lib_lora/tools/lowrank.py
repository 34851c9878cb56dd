"""Per-layer deltas to a plain kohya LoRA/LoCon: the engine of ``resize`` and ``merge``.

Each layer's contributions are summed exactly: plain LoRA factors are laid side by side
(``sum_i m_i up_i down_i = [m_i up_i] @ [down_i]``), anything else is materialised as its exact
delta.  ``rank=None`` keeps the sum exactly (factors as they are; other algorithms at their
numerical rank); a rank (or a dynamic method) keeps the best approximation of that rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..fileio import TensorFile
from ..merging import Contribution
from . import deltas, svd
from .common import cast
from .layout import Layer
from .progress import Progress


@dataclass
class LayerResult:
    key: str
    rank_in: Optional[int]   # sum of the inputs' LoRA ranks (None: another algorithm)
    rank: int
    energy: float            # squared Frobenius norm of the exact delta
    kept: float              # fraction of it the output holds

    @property
    def norm(self) -> float:
        return self.energy ** 0.5


@dataclass
class LowRankResult:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    layers: list[LayerResult] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)     # "key: reason"

    @property
    def kept(self) -> float:
        """Energy kept over all layers (a fraction of the total squared Frobenius norm)."""
        total = sum(l.energy for l in self.layers)
        return sum(l.energy * l.kept for l in self.layers) / total if total > 0 else 1.0

    def ranks(self) -> list[int]:
        return sorted({l.rank for l in self.layers})


def lora_tensors(layer: Layer, up: Tensor, down: Tensor, alpha: float, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """kohya tensors for ``up @ down`` on ``layer`` in its own layout (LoCon for convs)."""
    r, shape = down.shape[0], layer.shape
    if len(shape) > 2:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    k = layer.key
    return {f"{k}.lora_down.weight": cast(down, dtype), f"{k}.lora_up.weight": cast(up, dtype),
            f"{k}.alpha": cast(torch.tensor(float(alpha)), dtype)}


def build(groups: dict[Layer, list[Contribution]], *, rank: Optional[int], conv_rank: Optional[int] = None,
          method: Optional[str] = None, param: Optional[float] = None, min_norm: float = 0.0,
          base: TensorFile | None = None, dtype: torch.dtype | None = torch.float16,
          dev: torch.device | None = None, label: str = "layers") -> LowRankResult:
    dev = dev or svd.device()
    res = LowRankResult()
    bar = Progress(len(groups), label)
    for layer, contribs in groups.items():
        bar.update(note=layer.key)
        for c in contribs:
            if c.adapter.has_bias:
                res.dropped.append(f"{layer.key}: the bias change of {c.network} ({c.adapter.algo}); "
                                   "a LoRA holds weights only")
        if not deltas.representable(layer):
            res.dropped.append(f"{layer.key}: a {len(layer.shape)}-D weight (norm layer); a LoRA cannot hold it")
            continue
        target = conv_rank if (layer.is_conv3 and conv_rank is not None) else rank
        factors = [deltas.lora_factors(c, layer) for c in contribs]
        rank_in = sum(c.adapter.rank() for c in contribs) if all(f is not None for f in factors) else None
        if all(f is not None for f in factors):
            a = torch.cat([f[0] for f in factors], 1)
            b = torch.cat([f[1] for f in factors], 0)
            if target is None and method is None:   # exact: the factors themselves, scale 1
                energy = float(((a.T @ a) * (b @ b.T)).sum())
                if energy ** 0.5 < min_norm or energy == 0:
                    res.dropped.append(f"{layer.key}: norm {energy ** 0.5:.3g} below {min_norm:g}")
                    continue
                res.tensors.update(lora_tensors(layer, a, b, a.shape[1], dtype))
                res.layers.append(LayerResult(layer.key, rank_in, a.shape[1], energy, 1.0))
                continue
            fac = svd.factorise(factors=(a, b), rank=target or a.shape[1], method=method, param=param, dev=dev)
        else:
            w = deltas.base_weight(base, layer) if any(c.adapter.needs_weight for c in contribs) else None
            m = sum(deltas.delta(c, layer, w, dev) for c in contribs).reshape(layer.shape[0], -1)
            fac = svd.factorise(m, rank=target or min(m.shape), method=method, param=param, dev=dev)
            del m
        if fac.rank == 0 or fac.norm < min_norm:
            res.dropped.append(f"{layer.key}: norm {fac.norm:.3g} below {min_norm:g}")
            continue
        res.tensors.update(lora_tensors(layer, fac.up, fac.down, fac.rank, dtype))
        res.layers.append(LayerResult(layer.key, rank_in, fac.rank, fac.norm ** 2, fac.kept))
    return res


def report_lines(res: LowRankResult, per_layer: bool = True) -> list[str]:
    """What the tools print: energy kept per layer (as % of the delta's Frobenius norm squared) and overall."""
    out = []
    if per_layer:
        for l in res.layers:
            r_in = str(l.rank_in) if l.rank_in is not None else "full"
            out.append(f"{l.key:<72} rank {r_in:>4} -> {l.rank:<4} energy kept {100 * l.kept:7.3f}%  "
                       f"(norm {l.norm:.4g})")
    for d in res.dropped:
        out.append(f"dropped {d}")
    ranks = res.ranks()
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}" if ranks else "-"
    out.append(f"{len(res.layers)} layers, rank {span}, energy kept overall {100 * res.kept:.3f}%")
    return out
