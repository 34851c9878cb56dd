"""Low-rank factorisation for resize, merge and extract (GPU when available, CPU otherwise).

A delta given as factors ``A @ B`` (LoRA up/down, or several LoRAs side by side) is decomposed
exactly through QR of the thin factors and an SVD of the small core, never forming the full
matrix; anything else is an SVD of the matrix itself.  Rank choice follows kohya's published
``resize_lora.py`` behaviour: a fixed rank, or per layer ``sv_ratio`` (keep singular values above
max/ratio), ``sv_fro`` (smallest rank keeping that fraction of the Frobenius norm) or
``sv_cumulative`` (smallest rank whose singular values sum to that fraction), capped by the rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# singular values this far below the largest are float32 noise of an exactly lower-rank matrix
_NOISE = 1e-6


def device(preferred: str | None = None) -> torch.device:
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Factorised:
    up: Tensor        # [out, r], singular values split evenly: up @ down is the rank-r approximation
    down: Tensor      # [r, in]
    s: Tensor         # all singular values (float32, CPU)
    rank: int

    @property
    def kept(self) -> float:
        """Fraction of the squared Frobenius norm (energy) the kept rank holds."""
        total = float((self.s ** 2).sum())
        return float((self.s[: self.rank] ** 2).sum()) / total if total > 0 else 1.0

    @property
    def norm(self) -> float:
        return float((self.s ** 2).sum()) ** 0.5


def svd_of_product(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of ``a @ b`` for a [m, k], b [k, n], exactly, in O((m + n) k^2)."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, vh @ qb.T


def choose_rank(s: Tensor, rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep (0 when the matrix is zero)."""
    s = s.float().cpu()
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    nonzero = int((s > s[0] * _NOISE).sum())
    if method is None:
        r = rank
    elif method == "sv_ratio":
        r = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        frac = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        r = int(torch.searchsorted(frac, torch.tensor(param ** 2) - 1e-7)) + 1
    elif method == "sv_cumulative":
        frac = torch.cumsum(s, 0) / s.sum()
        r = int(torch.searchsorted(frac, torch.tensor(param) - 1e-7)) + 1
    else:
        raise ValueError(f"unknown rank method {method!r} ({', '.join(METHODS)})")
    return max(1, min(r, rank, nonzero))


def factorise(matrix: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None, *, rank: int,
              method: str | None = None, param: float | None = None, dev: torch.device | None = None) -> Factorised:
    """Best rank-r approximation (Eckart–Young) of ``matrix`` or of ``factors[0] @ factors[1]``."""
    dev = dev or device()
    if factors is not None:
        a, b = (f.to(dev, torch.float32) for f in factors)
        u, s, vh = svd_of_product(a, b)
    else:
        u, s, vh = torch.linalg.svd(matrix.to(dev, torch.float32), full_matrices=False)
    r = choose_rank(s, rank, method, param)
    root = s[:r].sqrt()
    return Factorised((u[:, :r] * root).cpu(), (root[:, None] * vh[:r]).cpu(), s.cpu(), r)
