"""Epoch order that a resumed run reproduces exactly.

Randomness (epoch order, caption shuffle/dropout, flips, random crops, and the trainer's noise)
never uses global state: each epoch and each sample derive their own ``random.Random`` from
(seed, epoch, batch index, slot, purpose), so resuming at a saved ``Position`` reproduces
exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .buckets import Size

if TYPE_CHECKING:  # for the hints only: dataset.py imports this module
    from .dataset import ImageItem


@dataclass(frozen=True)
class Position:
    """Where training stands: ``index`` batches of ``epoch`` (0-based) are done."""
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(int(d["epoch"]), int(d["index"]))


def derive_rng(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible RNG for (seed, parts...); stable across processes (no hash())."""
    digest = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def derive_seed(seed: int, *parts: object) -> int:
    """A torch seed for (seed, parts...), as reproducible as ``derive_rng``."""
    return derive_rng(seed, *parts).getrandbits(63)


@dataclass(frozen=True)
class Batch:
    epoch: int
    index: int
    bucket: Size
    items: tuple[ImageItem, ...]
    seed: int

    @property
    def next_position(self) -> Position:
        """Save this after the optimiser step for this batch; resuming there continues with the next batch."""
        return Position(self.epoch, self.index + 1)

    def rng(self, slot: int, purpose: str) -> random.Random:
        """Per-sample RNG, independent of other samples, so a resumed run draws the same numbers."""
        return derive_rng(self.seed, "sample", self.epoch, self.index, slot, purpose)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")


def epoch_plan(items: Sequence[ImageItem], epoch: int, batch_size: int, seed: int) -> list[tuple[Size, list[int]]]:
    """One epoch's batches as (bucket, item indices): every item ``repeats`` times, one bucket per batch."""
    rng = derive_rng(seed, "epoch", epoch)
    by_bucket: dict[Size, list[int]] = {}
    for idx, it in enumerate(items):
        by_bucket.setdefault(it.bucket, []).extend([idx] * it.repeats)
    plan: list[tuple[Size, list[int]]] = []
    for bucket in sorted(by_bucket):  # sorted so the plan never depends on dict/scan order
        entries = by_bucket[bucket]
        rng.shuffle(entries)
        plan += [(bucket, entries[i:i + batch_size]) for i in range(0, len(entries), batch_size)]
    rng.shuffle(plan)  # interleave buckets across the epoch
    return plan
