"""The patcher's start=/stop= side: gates that follow the sampling step, and layers merged only
while their gate is open.

A scheduled network's cheap layers are hooked (bypass.py) and only read their gate.  Its other
layers are merged while the gate is open: at each flip they are re-merged from their kept originals,
so every step is exactly the plain merge of the networks open then.  At activation a weight with a
closed gated contribution is merged once, off the model, with every contribution in (the most a flip
can add), so that no flip during sampling can fail or overflow.

``Schedules`` is the base the patcher builds on: it owns the wanted contributions with their gates,
and calls back into the patcher for the merge itself (``_merge``, ``_roll_back``, ``_drop_stale``,
``_signature`` and the kept originals in ``slots``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import autocast
from .adapters import dora
from .bypass import HOOK_MAX_COST, Bypass, Gate
from .merging import Contribution, fits_dtype, original_for, overflowing, sum_into

Key = tuple[int, str]  # (module id, parameter name): one weight


class Schedules:
    # what the patcher supplies: the kept originals by weight, and the DoRA mode merges use
    slots: dict
    dora_mode: str

    def __init__(self) -> None:
        self.bypass = Bypass()
        self.gates: list[Gate] = []
        self.step = 0
        # start=/stop= layers whose hook costs more than this share of the layer (bypass.hook_cost)
        # are merged while their gate is open instead
        self.hook_max_cost: float = HOOK_MAX_COST
        # per weight: the contributions wanted, with the gate each follows (None: always)
        self._contribs: dict[Key, list[tuple[Contribution, Gate | None]]] = {}
        self._owners: dict[Key, tuple[nn.Module, str]] = {}
        self._checked: dict[Key, tuple] = {}  # gated weights whose full merge passed _check_closed

    def set_step(self, step: int) -> None:
        """Sampling progressed: open/close the gates of scheduled networks.  Hooked layers only see
        the gate; layers merged while it is open are re-merged from their originals when it flips."""
        self.step = step
        flipped = False
        for gate in self.gates:
            before = gate.factor
            gate.set_step(step)
            flipped = flipped or (gate.merges and gate.factor != before)
        if flipped:
            self._remerge()

    def drop_schedules(self) -> None:
        """Take the scheduled networks away (hooks removed, gated merges undone); merged networks stay."""
        merges = any(g.merges for g in self.gates)
        self._drop_hooks()
        if merges:
            kept = {k: [(c, g) for c, g in lst if g is None] for k, lst in self._contribs.items()}
            self._contribs = {k: lst for k, lst in kept.items() if lst}
            self._remerge()

    def _forget_wanted(self) -> None:
        """No contribution wanted any more, none hooked."""
        self._contribs, self._owners, self._checked = {}, {}, {}
        self._drop_hooks()

    def _drop_hooks(self) -> None:
        self.bypass.remove()
        self.bypass.terms.clear()
        self.gates = []
        self.step = 0

    def _effective(self) -> dict[Key, list[Contribution]]:
        """The contributions to merge now: static ones and those whose gate is open, in prompt order."""
        out = {}
        for k, lst in self._contribs.items():
            now = [c for c, g in lst if g is None or g.factor]
            if now:
                out[k] = now
        return out

    def _check_closed(self, over: dict[str, int], bad: dict[str, list[str]], failed: set, dora_fn) -> None:
        """Weights with a gated contribution not merged now: check they merge, and stay finite, with every
        contribution in (the most a flip can add), so that no flip during sampling can fail.  Networks
        that would overflow are counted in ``over``."""
        checked = {}
        for k, lst in self._contribs.items():
            if all(g is None or g.factor for _, g in lst):
                continue  # all merged now: the merge itself checks them
            contribs = [c for c, _ in lst]
            sig = self._signature(contribs)
            if self._checked.get(k) == sig:
                checked[k] = sig
                continue
            module, pname = self._owners[k]
            param = getattr(module, pname)
            slot = self.slots.get(k)
            base = slot.original if slot is not None else param.detach()
            merged = base.to(param.device, torch.float32, copy=True)
            original = original_for(merged, contribs)
            n_failed = len(failed)
            # the static contributions' own errors are the merge's to report
            sum_into(merged, original, [c for c, g in lst if g is None], pname, dora_fn, {}, set(), k)
            sum_into(merged, original, [c for c, g in lst if g is not None], pname, dora_fn, bad, failed, k)
            if not fits_dtype(merged, param.dtype):
                for culprit in overflowing(contribs, base, param, pname, dora_fn):
                    over[culprit] = over.get(culprit, 0) + 1
            elif len(failed) == n_failed:
                checked[k] = sig
        self._checked = checked

    @torch.no_grad()
    def _remerge(self) -> None:
        with autocast.disabled():  # as in apply: a flip happens inside the host's sampling autocast
            self._remerge_now()

    def _remerge_now(self) -> None:
        self._drop_stale()
        touched: list = []
        try:
            self._merge({}, {}, set(), touched, dora.strategy(self.dora_mode))
        except BaseException:
            self._roll_back(touched)
            raise

    # -- the merge itself, which the patcher supplies -------------------------------------
    def _merge(self, over: dict[str, int], bad: dict[str, list[str]], failed: set, touched: list, dora_fn) -> int:
        raise NotImplementedError

    def _roll_back(self, touched: list) -> None:
        raise NotImplementedError

    def _drop_stale(self) -> None:
        raise NotImplementedError

    def _signature(self, contribs: list[Contribution]) -> tuple:
        raise NotImplementedError
