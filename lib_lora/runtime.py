"""What one ``<lora:...>`` activation does, independent of the host.

The host hands over the current ModelMap and the parsed requests; the runtime
resolves names in the library, loads (or reuses) the networks and asks the patcher
to merge them.  Every problem becomes a message for the user, never an exception,
because one bad LoRA must not stop a generation.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from .adapters import dora
from .bundled import BundledEmbedding
from .fileio import LoraFileError
from .library import AmbiguousName, Library, LoraNotFound
from .live import LiveRegistry, LiveSnapshot, LiveUnavailable
from .modelmap import ModelMap
from .network import Network
from .params import LoraRequest
from .patcher import Activation, ApplyReport, Patcher


@dataclass
class ActivationResult:
    messages: list[str] = field(default_factory=list)
    hashes: list[tuple[str, str]] = field(default_factory=list)  # (name as written, short hash)
    applied: list[str] = field(default_factory=list)
    report: ApplyReport | None = None
    live: list[tuple[str, LiveSnapshot]] = field(default_factory=list)  # (name as written, what it meant), applied
    # (name as written, embedding) bundled in each loaded file, whether or not its layers applied (as the built-in)
    embeddings: list[tuple[str, BundledEmbedding]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # names no file answers (also in messages)


class Runtime:
    def __init__(self, library: Library):
        self.library = library
        self.patcher: Patcher | None = None
        self.lock = threading.RLock()
        self.dora_mode: str = dora.DEFAULT  # a host setting; handed to the patcher at each activation
        self.live = LiveRegistry()          # running training jobs' weights, as NAME@live (live.py)
        self._live_bound: list[Network] = []  # snapshots the patcher has bound: dropped at restore

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
    def active(self) -> bool:
        """Some LoRA is merged or hooked into the model (so an empty activation has work to do)."""
        patcher = self.patcher
        return patcher is not None and patcher.active

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
            loaded: list[tuple[LoraRequest, str, Callable[[], str], LiveSnapshot | None]] = []
            for req in requests:
                res.messages.extend(req.warnings)
                if req.scheduled and not steps:
                    res.messages.append(f"{req.name}: start=/stop= need a host that reports sampling steps "
                                        "(the WebUI does) — applied at every step")
                    req = req.without_schedule()
                try:
                    net, shorthash, snap = self._load(req.name)
                except (LoraNotFound, AmbiguousName, LoraFileError, OSError, LiveUnavailable) as e:
                    res.messages.append(str(e))
                    if isinstance(e, LoraNotFound):
                        res.missing.append(req.name)
                    continue
                res.embeddings.extend((req.name, emb) for emb in net.embeddings.values())
                loaded.append((req, net.name, shorthash, snap))
                if net.adapters:  # a file of bundled embeddings alone has no layers for the patcher
                    acts.append(Activation(net, req))
            report = self.patcher.apply(acts)
            res.report = report
            res.messages.extend(report.messages)
            with_layers = {act.network.name for act in acts}
            for req, netname, shorthash, snap in loaded:
                if netname in report.applied or netname not in with_layers:
                    res.applied.append(req.name)
                    res.hashes.append((req.name, shorthash()))
                    if snap is not None:
                        res.live.append((req.name, snap))
            return res

    def _load(self, name: str) -> tuple[Network, Callable[[], str], LiveSnapshot | None]:
        """The network ``name`` means, its short hash (computed when asked) and, for ``NAME@live``, the snapshot."""
        snap = self.live.lookup(name)
        if snap is not None:
            if not any(n is snap.network for n in self._live_bound):
                self._live_bound.append(snap.network)
            return snap.network, lambda: snap.shorthash, snap
        try:
            entry = self.library.resolve_fresh(name)
        except LoraNotFound:
            message = self.live.not_found(name)
            if message is None:
                raise
            raise LoraNotFound(message) from None
        return self.library.load(entry), entry.shorthash, None

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
            n = self.patcher.restore() if self.patcher else 0
            # a live snapshot is used for one pause of its job: do not keep it alive in the binding cache
            for net in self._live_bound:
                if self.patcher is not None:
                    self.patcher.unbind(net)
            self._live_bound.clear()
            return n
