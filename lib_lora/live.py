"""``<lora:NAME@live:w>``: the weights of a running training job, applied like a file.

A job that lets generations run between its steps registers a *source* here under its output
name.  While the job is paused for a generation, ``NAME@live`` resolves to a snapshot of the
job's trainable tensors taken at that step boundary, parsed into a ``Network`` exactly as the
file a save at that step would be (same tensors, dtype and metadata), so the patcher merges it
like any file.  Outside such a pause, or when no job of that name runs, the name gives a message.

The runtime consults a ``LiveRegistry``; training fills it.  This module knows neither side's
internals: the registry only holds objects with a ``snapshot()`` method.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from .network import Network

SUFFIX = "@live"
INFOTEXT_KEY = "LoRA Workshop live"  # generation info: which job, step and weights "@live" meant


class LiveUnavailable(LookupError):
    """A live name that cannot be applied now; the message is for the user."""


@dataclass(frozen=True)
class LiveSnapshot:
    network: Network
    job: str     # the job's id
    step: int    # optimiser steps done
    hash: str    # kohya's addnet hash of the tensors: the sshs_model_hash a file saved at this step carries

    @property
    def shorthash(self) -> str:
        return self.hash[:12]


class LiveSource(Protocol):
    def snapshot(self) -> LiveSnapshot:
        """The weights now; raises LiveUnavailable while they cannot be read consistently."""


def live_name(output_name: str) -> str:
    return output_name + SUFFIX


def is_live_name(name: str) -> bool:
    return name.strip().lower().endswith(SUFFIX) and len(name.strip()) > len(SUFFIX)


class LiveRegistry:
    """Output name -> the source of a running job's weights (at most one per name)."""

    def __init__(self) -> None:
        self._sources: dict[str, LiveSource] = {}
        self._lock = threading.Lock()

    def register(self, output_name: str, source: LiveSource) -> None:
        with self._lock:
            self._sources[output_name] = source

    def unregister(self, output_name: str, source: LiveSource) -> None:
        with self._lock:
            if self._sources.get(output_name) is source:
                del self._sources[output_name]

    def names(self) -> list[str]:
        with self._lock:
            return [live_name(n) for n in self._sources]

    def _source(self, name: str) -> LiveSource | None:
        base = name.strip()[: -len(SUFFIX)]
        with self._lock:
            if base in self._sources:
                return self._sources[base]
            folded = [s for n, s in self._sources.items() if n.casefold() == base.casefold()]
            return folded[0] if len(folded) == 1 else None

    def lookup(self, name: str) -> LiveSnapshot | None:
        """The snapshot ``name`` means, or None when it names no running job (then it may be a file).

        Raises LiveUnavailable when the job runs but its weights cannot be read now."""
        if not is_live_name(name):
            return None
        source = self._source(name)
        return source.snapshot() if source is not None else None

    def not_found(self, name: str) -> str | None:
        """The message for a live name that is neither a running job nor a file, else None."""
        if not is_live_name(name):
            return None
        base = name.strip()[: -len(SUFFIX)]
        return (f"Lora not found: {name} (no training job with output name {base!r} is running; "
                f"'{SUFFIX}' names the weights of a running job)")


def format_infotext(snapshots: list[tuple[str, LiveSnapshot]]) -> str:
    """(name as written, snapshot) pairs -> ``"NAME@live: job ID step N hash H, ..."``."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: job {s.job} step {s.step} hash {s.shorthash}"
                     for name, s in snapshots)
