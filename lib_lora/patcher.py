"""Merge adapter deltas into a model's weights and put the originals back exactly.

Each touched parameter gets a *slot*: a copy of its original value (on the backup
device, CPU by default) and the list of contributions currently merged into it.
``apply`` re-merges only slots whose wanted contributions changed and restores
slots no longer wanted.  Restoring copies the kept original back, never subtracts,
so any number of cycles leaves the weights bitwise identical.  Deltas are summed in
float32 and cast once, which is what makes fp16/bf16/fp8 weights behave.

If anything else rewrites a patched weight (a checkpoint loaded into the same
modules), the slot notices through the tensor's version counter and forgets its
now-stale original instead of restoring it.  Moving a module to another device or
dtype keeps the Parameter and its counter, so the original is still written back
(cast and moved as needed) — that is what --medvram and CPU offload rely on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import autocast, families
from .adapters import Adapter, dora
from .blockweights import target_block
from .bypass import Gate, hook_cost
from .elementweights import lbw_layer_name
from .merging import Contribution, fits_dtype, original_for, overflowing, precise_source, sum_into
from .modelmap import ModelMap, Target
from .network import Network
from .params import LoraRequest
from .schedules import Schedules


@dataclass(frozen=True)
class Activation:
    """A network wanted for the next generation, and the request (weights, blocks, steps) it was loaded for."""
    network: Network
    request: LoraRequest


@dataclass
class Binding:
    """A network matched against a ModelMap: which adapter goes to which target."""
    pairs: list[tuple[Target, Adapter]]
    unmatched: list[str]


@dataclass
class ApplyReport:
    messages: list[str] = field(default_factory=list)   # shown to the user
    applied: dict[str, int] = field(default_factory=dict)  # network name -> layers patched
    skipped: list[str] = field(default_factory=list)    # network names not applied at all
    changed_slots: int = 0
    overflowing: dict[str, int] = field(default_factory=dict)  # network -> layers it would make non-finite


@dataclass(eq=False)
class _Slot:
    module: nn.Module
    param: str
    original: Tensor
    contributions: tuple = ()
    version: int = -1
    obj: object = None   # the Parameter we wrote into; a different object means the model was rebuilt

    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)


@dataclass
class _Plan:
    """What one activation wants: per weight (module id, parameter name) its contributions, each with
    the gate it is merged under (None: always), and the scheduled layers to hook instead."""
    contribs: dict[tuple[int, str], list[tuple[Contribution, Gate | None]]] = field(default_factory=dict)
    owners: dict[tuple[int, str], tuple[nn.Module, str]] = field(default_factory=dict)
    hooks: list[tuple[Contribution, Gate]] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)


@dataclass
class _Errors:
    """Layers whose maths raised: the messages per network, and (weight, adapter id) pairs."""
    bad: dict[str, list[str]] = field(default_factory=dict)
    failed: set[tuple[tuple[int, str], int]] = field(default_factory=set)


def bind(network: Network, mm: ModelMap) -> Binding:
    pairs, unmatched = [], []
    for key, adapter in network.adapters.items():
        target = mm.get(key)
        if target is None:
            unmatched.append(key)
        else:
            pairs.append((target, adapter))
    return Binding(pairs, unmatched)


class Patcher(Schedules):
    """Networks merged into (or hooked onto) one ModelMap's layers; its start=/stop= side is ``Schedules``."""

    def __init__(self, mm: ModelMap, backup_device: str | torch.device = "cpu"):
        super().__init__()
        self.mm = mm
        self.backup_device = torch.device(backup_device)
        self.slots: dict[tuple[int, str], _Slot] = {}
        self._bindings: dict[int, tuple[Network, Binding]] = {}
        self.dora_mode: str = dora.DEFAULT  # how DoRA magnitudes merge (adapters/dora.py); layers re-merge on change
        self._blocks: dict[Target, str | None] = {}
        self._lbw_names: dict[Target, str | None] = {}

    # -- public --------------------------------------------------------------------------
    def binding(self, network: Network) -> Binding:
        hit = self._bindings.get(id(network))
        if hit is None or hit[0] is not network:
            hit = (network, bind(network, self.mm))
            self._bindings[id(network)] = hit
            if len(self._bindings) > 64:
                self._bindings.pop(next(iter(self._bindings)))
        return hit[1]

    def unbind(self, network: Network) -> None:
        """Drop ``network``'s cached binding (a network used once need not stay alive here)."""
        hit = self._bindings.get(id(network))
        if hit is not None and hit[0] is network:
            del self._bindings[id(network)]

    def block(self, target: Target) -> str | None:
        """The LBW block of ``target`` (cached: the map's targets live as long as the patcher)."""
        if target not in self._blocks:
            self._blocks[target] = target_block([target.key, *target.aliases])
        return self._blocks[target]

    def lbw_name(self, target: Target) -> str | None:
        """The name LBW's element weights match ``target`` by (cached like ``block``)."""
        if target not in self._lbw_names:
            self._lbw_names[target] = lbw_layer_name([target.key, *target.aliases], self.mm.family)
        return self._lbw_names[target]

    def check_family(self, network: Network) -> str | None:
        """A user-facing reason to refuse ``network`` on this model, or None."""
        if network.family and network.family != self.mm.family:
            return (f"{network.name} is an {families.display(network.family)} LoRA, "
                    f"the loaded model is {families.display(self.mm.family)} — skipped")
        return None

    @torch.no_grad()
    def apply(self, activations: list[Activation]) -> ApplyReport:
        """Make exactly ``activations`` merged (or hooked); a network whose merge would put a
        non-finite value into a weight is left out, with a message, and the others applied.

        Autocast is switched off here: a host may activate inside it (the WebUI does), and it would
        run the delta maths in half precision, changing the merged bits."""
        with autocast.disabled():
            return self._apply_finite(activations)

    def _apply_finite(self, activations: list[Activation]) -> ApplyReport:
        report = self._apply(activations)
        left_out: list[str] = []
        while report.overflowing:
            names = set(report.overflowing)
            left_out += [f"{n}: merging it would make the model's weights overflow or become NaN "
                         f"(at these weights, in {report.overflowing[n]} layers) — skipped" for n in sorted(names)]
            activations = [a for a in activations if a.network.name not in names]
            report = self._apply(activations)
            report.skipped += sorted(names)
        report.messages[:0] = left_out
        return report

    def _apply(self, activations: list[Activation]) -> ApplyReport:
        """One attempt: plan every network's layers, merge and hook them, count what applied."""
        report = ApplyReport()
        self._drop_stale()
        self.step = 0  # an activation precedes a sampling pass
        plan = _Plan()
        for activation in activations:
            self._plan_network(activation, plan, report)
        errors = _Errors()
        hooked = self._commit(plan, report, errors)
        self._tally(plan, report, errors, hooked)
        return report

    def _admit(self, net: Network, req: LoraRequest, report: ApplyReport) -> Binding | None:
        """The network's binding to this model, or None (with the reason in ``report``) when it is skipped."""
        reason = self.check_family(net)
        if reason:
            report.messages.append(reason)
            report.skipped.append(net.name)
            return None
        b = self.binding(net)
        if not b.pairs:
            report.messages.append(f"{net.name}: none of its {len(net.adapters)} layers match the loaded model — skipped")
            report.skipped.append(net.name)
            return None
        if b.unmatched:
            report.messages.append(
                f"{net.name}: {len(b.unmatched)} of {len(net.adapters)} layers have no counterpart in the "
                f"loaded model (e.g. {b.unmatched[0]})")
        report.applied[net.name] = 0
        if req.blocks is not None and self.mm.family == "sd3":
            report.messages.append(f"{net.name}: LoRA Block Weight defines no blocks for SD3's MMDiT — lbw= "
                                   "scales only its text encoders (BASE)")
        if req.elements is not None and self.mm.family == "sd3":
            report.messages.append(f"{net.name}: LoRA Block Weight defines no layer names for SD3 — "
                                   f"lbwe={req.elements.name} ignored")
        return b

    def _plan_network(self, activation: Activation, plan: "_Plan", report: ApplyReport) -> None:
        """Add one network's layers to ``plan``: merged, merged while its gate is open, or hooked."""
        net, req = activation.network, activation.request
        gate = None
        if req.scheduled:
            gate = Gate(req.start, req.stop)
            gate.set_step(self.step)
            plan.gates.append(gate)
        b = self._admit(net, req, report)
        if b is None:
            return
        for target, adapter in b.pairs:
            if req.per_layer:
                mult = req.multiplier(target, self.block(target),
                                      self.lbw_name(target) if req.elements is not None else None)
            else:
                mult = req.multiplier(target, None)
            if mult == 0:
                continue
            contribution = Contribution(target, adapter, float(mult), req.dyn, net.name)
            merge_gate = None  # merged only while this gate is open
            if gate is not None and not target.is_text_encoder:
                cost = hook_cost(target, adapter, req.dyn)  # inf: no hook fits this layer
                if cost != math.inf and cost <= self.hook_max_cost:
                    plan.hooks.append((contribution, gate))
                    continue
                merge_gate = gate
                gate.merges = True
            for pname in (target.weight_name, target.bias_name if adapter.has_bias else None):
                if pname is None or getattr(target.module, pname, None) is None:
                    continue
                k = (id(target.module), pname)
                plan.owners[k] = (target.module, pname)
                plan.contribs.setdefault(k, []).append((contribution, merge_gate))

    def _commit(self, plan: "_Plan", report: ApplyReport, errors: "_Errors") -> dict[str, int]:
        """Merge and hook what ``plan`` wants; on any exception put every weight back and re-raise.
        Returns the layers hooked per network."""
        touched: list[_Slot] = []
        dora_fn = dora.strategy(self.dora_mode)
        try:
            self._owners, self._contribs = plan.owners, plan.contribs
            self._check_closed(report.overflowing, errors.bad, errors.failed, dora_fn)
            report.changed_slots += self._merge(report.overflowing, errors.bad, errors.failed, touched, dora_fn)
            # a gated contribution that cannot merge is not retried when its gate flips
            self._contribs = {k: [(c, g) for c, g in lst if g is None or (k, id(c.adapter)) not in errors.failed]
                              for k, lst in plan.contribs.items()}
            hooked = self.bypass.sync(plan.hooks, self._originals, errors.bad, report.overflowing, dora_fn)
            self.gates = plan.gates
        except BaseException:
            self._roll_back(touched)
            raise
        return hooked

    @staticmethod
    def _tally(plan: "_Plan", report: ApplyReport, errors: "_Errors", hooked: dict[str, int]) -> None:
        """Layers applied per network, and the failures as messages; a network none of whose layers
        applied is skipped."""
        for netname, errs in errors.bad.items():
            report.messages.append(f"{netname}: {len(errs)} layers did not match ({errs[0]})")
        for k, lst in plan.contribs.items():
            for c, _ in lst:
                if k[1] == c.target.weight_name and c.network in report.applied and \
                        (k, id(c.adapter)) not in errors.failed:
                    report.applied[c.network] += 1
        for netname, n in hooked.items():
            if netname in report.applied:
                report.applied[netname] += n
        for netname in errors.bad:
            if report.applied.get(netname) == 0:  # every layer failed: not applied at all
                del report.applied[netname]
                report.skipped.append(netname)

    def _signature(self, contribs: list[Contribution]) -> tuple:
        return tuple((id(a), id(t), m, d, self.dora_mode if a.dora_scale is not None else None)
                     for t, a, m, d, _ in contribs)

    def _merge(self, over: dict[str, int], bad: dict[str, list[str]], failed: set, touched: list,
               dora_fn) -> int:
        """Bring every slot to its effective contributions, re-merging only those that changed; returns
        how many changed.  Networks whose merge would not be finite are counted in ``over``."""
        changed = 0
        wanted = self._effective()
        for k, slot in list(self.slots.items()):
            if k not in wanted:
                self._write(slot, slot.original)
                del self.slots[k]
                changed += 1
        for k, contribs in wanted.items():
            module, pname = self._owners[k]
            sig = self._signature(contribs)
            slot = self.slots.get(k)
            if slot is not None and slot.contributions == sig:
                continue
            param = getattr(module, pname)
            precise = precise_source(module, pname, param)
            base = precise if precise is not None else slot.original if slot is not None else param.detach()
            if slot is not None and param.dtype == torch.float32 and \
                    param.data.data_ptr() != slot.original.data_ptr():
                touched.append(slot)
                merged = param.data  # our previous merge: re-merge in place, no new allocation
                merged.copy_(base)
            else:
                merged = base.to(param.device, torch.float32, copy=True)
            sum_into(merged, original_for(merged, contribs), contribs, pname, dora_fn, bad, failed, k)
            if not fits_dtype(merged, param.dtype):
                for culprit in overflowing(contribs, base, param, pname, dora_fn):
                    over[culprit] = over.get(culprit, 0) + 1
                if slot is not None:  # its storage may hold the failed merge: back to the original
                    self._write(slot, slot.original)
                    del self.slots[k]
                    changed += 1
                continue
            if slot is None:
                # Where the backup lives with the weight, the current storage *becomes* the backup
                # (the merged tensor is swapped in by _write), saving a full copy of every layer.
                keep = param.data if param.device == self.backup_device else \
                    param.detach().to(self.backup_device, copy=True)
                slot = _Slot(module, pname, keep)
                self.slots[k] = slot
            if not touched or touched[-1] is not slot:
                touched.append(slot)
            self._write(slot, merged)
            slot.contributions = sig
            changed += 1
        return changed

    def _roll_back(self, touched: list[_Slot]) -> None:
        """Never leave a half-patched model behind: put back everything a failed merge changed."""
        for slot in touched:
            self._write(slot, slot.original)
        self.restore()

    def _originals(self, target: Target) -> tuple[Tensor, Tensor | None]:
        """The layer's weight and bias before any merge, on the layer's device."""
        out = []
        for pname in (target.weight_name, target.bias_name):
            t = getattr(target.module, pname, None) if pname else None
            slot = self.slots.get((id(target.module), pname)) if t is not None else None
            out.append(None if t is None else (slot.original if slot is not None else t.detach()).to(t.device))
        return out[0], out[1]

    @torch.no_grad()
    def restore(self) -> int:
        """Put every patched weight back; returns how many were restored."""
        self._drop_stale()
        self._forget_wanted()
        n = 0
        for slot in self.slots.values():
            self._write(slot, slot.original)
            n += 1
        self.slots.clear()
        return n

    def forget(self) -> None:
        """The model was replaced or reloaded: drop originals without writing them back."""
        self._forget_wanted()
        self.slots.clear()
        self._bindings.clear()

    @property
    def active(self) -> bool:
        return bool(self.slots) or bool(self.bypass) or bool(self.gates)

    # -- internals -----------------------------------------------------------------------
    def _write(self, slot: _Slot, value: Tensor) -> None:
        t = slot.tensor()
        if value.data_ptr() == t.data_ptr() and value.dtype == t.dtype:
            pass  # merged in place already
        elif value.device == t.device and value.shape == t.shape:
            # swap storage instead of copying; `value` is a fresh merge or the kept original
            t.data = value if value.dtype == t.dtype else value.to(t.dtype)
        else:
            t.data.copy_(value.to(t.device))  # .data: no autograd version bump of our own
        slot.version, slot.obj = t._version, t

    def _drop_stale(self) -> None:
        for k, slot in list(self.slots.items()):
            t = getattr(slot.module, slot.param, None)
            if t is None or t is not slot.obj or t._version != slot.version:
                del self.slots[k]
