"""What one ``<lora:...>`` activation does, independent of the host.

The host hands over the current ModelMap and the parsed requests; the runtime
resolves names in the library, loads (or reuses) the networks and asks the patcher
to merge them.  Every problem becomes a message for the user, never an exception,
because one bad LoRA must not stop a generation.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .adapters import dora
from .fileio import LoraFileError
from .library import AmbiguousName, Entry, Library, LoraNotFound
from .modelmap import ModelMap
from .params import LoraRequest
from .patcher import Activation, ApplyReport, Patcher


@dataclass
class ActivationResult:
    messages: list[str] = field(default_factory=list)
    hashes: list[tuple[str, str]] = field(default_factory=list)  # (name as written, short hash)
    applied: list[str] = field(default_factory=list)
    report: ApplyReport | None = None


class Runtime:
    def __init__(self, library: Library):
        self.library = library
        self.patcher: Patcher | None = None
        self.lock = threading.RLock()
        self.dora_mode: str = dora.DEFAULT  # a host setting; handed to the patcher at each activation

    def set_model(self, mm: ModelMap | None) -> None:
        """Point at a new model map (the same map again is a no-op).

        Switching away first puts the previous model's weights back: a host may keep that
        model in memory and switch back to it later without telling us (the WebUI's
        checkpoint cache does), and forgetting the originals would bake the LoRA into it.
        Weights a checkpoint load already overwrote are recognised as stale and dropped.
        """
        with self.lock:
            if self.patcher is not None:
                if mm is not None and self.patcher.mm is mm:
                    return
                try:
                    self.patcher.restore()
                except Exception:  # e.g. the old model was moved to the meta device: nothing to save
                    self.patcher.forget()
            self.patcher = Patcher(mm) if mm is not None else None

    @property
    def model_map(self) -> ModelMap | None:
        return self.patcher.mm if self.patcher else None

    def activate(self, requests: list[LoraRequest], steps: bool = False) -> ActivationResult:
        """Make exactly ``requests`` active (an empty list restores the model).

        ``steps``: the host calls ``set_step`` during sampling, so start=/stop= can be honoured;
        without it they are dropped with a message and the LoRA applies at every step.
        """
        res = ActivationResult()
        with self.lock:
            if self.patcher is None:
                if requests:
                    res.messages.append("LoRA: no model is loaded — LoRAs skipped")
                return res
            self.patcher.dora_mode = self.dora_mode
            acts: list[Activation] = []
            entries: list[tuple[LoraRequest, Entry]] = []
            for req in requests:
                res.messages.extend(req.warnings)
                if req.scheduled and not steps:
                    res.messages.append(f"{req.name}: start=/stop= need a host that reports sampling steps "
                                        "(the WebUI does) — applied at every step")
                    req = req.without_schedule()
                try:
                    entry = self.library.resolve(req.name)
                    net = self.library.load(entry)
                except (LoraNotFound, AmbiguousName, LoraFileError, OSError) as e:
                    res.messages.append(str(e))
                    continue
                acts.append(Activation(net, req.te, req.unet, req.dyn, req.blocks, req.start, req.stop, req.elements))
                entries.append((req, entry))
            report = self.patcher.apply(acts)
            res.report = report
            res.messages.extend(report.messages)
            for req, entry in entries:
                if entry.relname in report.applied:
                    res.applied.append(req.name)
                    res.hashes.append((req.name, entry.shorthash()))
            return res

    def set_step(self, step: int) -> bool:
        """Sampling steps done so far; True when some active LoRA follows a schedule."""
        patcher = self.patcher
        if patcher is None or not patcher.gates:  # the common case, every step: no lock
            return False
        with self.lock:  # a flip may re-merge layers
            patcher.set_step(step)
        return True

    def drop_schedules(self) -> None:
        with self.lock:
            if self.patcher is not None:
                self.patcher.drop_schedules()

    def restore(self) -> int:
        with self.lock:
            return self.patcher.restore() if self.patcher else 0
