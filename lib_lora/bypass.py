"""LoRAs whose weight changes during sampling (start=/stop=): hooked onto layer outputs, or merged
only while their gate is open.

A gate flips at most twice per sampling pass, so a layer can take either route exactly:

- merged at the flip (the patcher re-merges the layer from its kept original when the gate opens
  and again when it closes): two merges per pass, and each step then costs what a merged step does;
- hooked: a forward hook adds the adapter's output at every step while the gate is open, and
  nothing is ever written.

``hook_cost`` weighs the two per layer: the hook's multiply-adds per output element relative to the
layer's own.  A low-rank branch at rank 16 on a 1280-wide layer is a few percent of the layer, so
hooking it costs less than two merges; at rank 128 on a 320-wide one it is most of the layer again,
at every step.  The patcher hooks a layer only when that ratio is at most its ``hook_max_cost``.

Two kinds of hook term:

- ``LowRank``: plain LoRA/LoCon on a Linear or Conv2d, ``out += s * up(down(x))`` at rank width
  (the down projection takes the layer's kernel, stride and padding, like kohya's LoCon);
- ``DeltaOutput``: everything else (LoHa, LoKr, IA3, Full, Norm, DoRA, CP cores): the weight and
  bias deltas are computed once, against the original weight, and the layer's own operation is
  applied to them (``F.linear(x, dW, db)``, the conv with its padding, ``group_norm`` with dW as
  scale).  Because every layer op is linear in its weight and bias, that is exactly what merging
  the same deltas would add.

Hooks hold no reference the model keeps: ``Bypass.remove`` deletes them and leaves the modules
(and their weights, never written) as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import Adapter, AdapterError
from .adapters.base import DoraFn, delta_tensor
from .autocast import autocasting
from .merging import MATH_ERRORS, OOM, error_text, fits_dtype
from .modelmap import Target


# the default ``Patcher.hook_max_cost``: a hook may add up to this share of a layer's own work per step
HOOK_MAX_COST = 1 / 16


@dataclass(eq=False)
class Gate:
    """On for steps in [start, stop); ``step`` counts sampling steps already done.

    ``merges``: some layer of its network is merged while the gate is open (not hooked), so a
    flip must re-merge those layers."""
    start: int | None = None
    stop: int | None = None
    factor: float = 1.0
    merges: bool = False

    def set_step(self, step: int) -> None:
        on = (self.start is None or step >= self.start) and (self.stop is None or step < self.stop)
        self.factor = 1.0 if on else 0.0


def _store_dtype(weight: Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
        else torch.float32


class _Term:
    gate: Gate
    tensors: tuple[str, ...] = ()

    def _match(self, x: Tensor) -> None:
        """Follow the input's device (offloading moves modules) and, outside autocast, its dtype."""
        first = getattr(self, self.tensors[0])
        cast = not autocasting(x.device.type) and first.dtype != x.dtype and x.is_floating_point()
        if first.device != x.device or cast:
            dtype = x.dtype if cast else first.dtype
            for name in self.tensors:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.to(x.device, dtype))

    def add(self, out: Tensor, x: Tensor, factor: float) -> Tensor:
        raise NotImplementedError


class LowRank(_Term):
    tensors = ("down", "up")

    def __init__(self, module: nn.Module, adapter: Adapter, multiplier: float, dyn: int | None):
        t = adapter.tensors
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        self.scale = multiplier * (adapter.alpha / rank if adapter.alpha is not None else 1.0)
        if dyn is not None and 0 < dyn < rank:
            down, up = down[:dyn], up[:, :dyn]
        w = module.weight
        dtype = _store_dtype(w)
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            down = down if down.dim() == 4 else down.reshape(*down.shape, 1, 1)
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        else:
            down, up = down.flatten(1), up.flatten(1)
        if up.shape[0] != w.shape[0] or down.shape[1] != w.shape[1] or (self.conv and down.shape[2:] != w.shape[2:]):
            raise AdapterError(f"{adapter.name}: lora_up {tuple(up.shape)} / lora_down {tuple(down.shape)} "
                               f"do not fit layer weight {tuple(w.shape)}")
        self.down = down.to(w.device, dtype)
        self.up = up.to(w.device, dtype)

    @staticmethod
    def fits(module: nn.Module, adapter: Adapter) -> bool:
        if adapter.algo != "lora" or adapter.dora_scale is not None or "lora_mid.weight" in adapter.tensors:
            return False
        if isinstance(module, nn.Linear):
            return True
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
            and isinstance(module.padding, tuple)

    def add(self, out: Tensor, x: Tensor, factor: float) -> Tensor:
        self._match(x)
        s = factor * self.scale
        if self.conv:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
            return _plus(out, F.conv2d(h * s, self.up))
        h = F.linear(x, self.down) * s
        if out.dtype == h.dtype and out.dim() >= 2:
            # one GEMM writes out + h @ up.T: no separate layer-wide result
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.up.t()).view(out.shape)
        return _plus(out, F.linear(h, self.up))


class DeltaOutput(_Term):
    tensors = ("dw", "db")

    def __init__(self, module: nn.Module, dw: Tensor | None, db: Tensor | None):
        self.module = module
        w = module.weight
        self.dw = (dw if dw is not None else torch.zeros_like(w, dtype=torch.float32)).to(w.device, _store_dtype(w))
        self.db = db.to(w.device, _store_dtype(w)) if db is not None else None

    @staticmethod
    def fits(module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm))

    def add(self, out: Tensor, x: Tensor, factor: float) -> Tensor:
        m = self.module
        self._match(x)
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            # normalisation runs in float32 (as ldm's GroupNorm32 does); dW scales the normalised input
            db = self.db.float() if self.db is not None else None
            y = F.group_norm(x.float(), m.num_groups, self.dw.float(), db, m.eps) if isinstance(m, nn.GroupNorm) \
                else F.layer_norm(x.float(), m.normalized_shape, self.dw.float(), db, m.eps)
        else:
            y = F.linear(x, self.dw, self.db) if isinstance(m, nn.Linear) else m._conv_forward(x, self.dw, self.db)
        return _plus(out, y if factor == 1 else y * factor)


def _plus(out: Tensor, y: Tensor) -> Tensor:
    y = y.to(out.dtype)
    if torch.is_grad_enabled():
        return out + y
    return out.add_(y)  # the layer's fresh output, not yet seen by anyone: no second copy


def hook_cost(target: Target, adapter: Adapter, dyn: int | None) -> float:
    """The hook's multiply-adds per output element over the layer's own; ``inf`` where no hook fits.

    A ``LowRank`` term runs down (``rank * in * kernel``) and up (``out * rank``) against the
    layer's ``out * in * kernel``; a ``DeltaOutput`` term runs the layer's operation a second time.
    """
    module = target.module
    if target.rows is not None or target.weight_name != "weight":
        return math.inf
    if LowRank.fits(module, adapter):
        w = module.weight
        out_f, in_f = w.shape[0], w.shape[1]
        kernel = math.prod(w.shape[2:])
        rank = adapter.tensors["lora_down.weight"].shape[0]
        if dyn is not None and 0 < dyn < rank:
            rank = dyn
        return rank * (in_f * kernel + out_f) / (out_f * in_f * kernel)
    return 1.0 if DeltaOutput.fits(module) else math.inf


def make_term(target: Target, adapter: Adapter, multiplier: float, dyn: int | None,
              original_weight: Tensor, bias: Tensor | None, dora: Optional[DoraFn] = None) -> _Term:
    """The bypass form of ``adapter`` on ``target`` at ``multiplier`` (AdapterError if it cannot be).

    ``dora`` is the DoRA strategy merged layers use, so a step range never changes the maths.
    """
    module = target.module
    if target.rows is not None or target.weight_name != "weight":
        raise AdapterError(f"{adapter.name}: a fused (sliced) layer cannot follow a step schedule")
    if LowRank.fits(module, adapter):
        return LowRank(module, adapter, multiplier, dyn)
    if not DeltaOutput.fits(module):
        raise AdapterError(f"{adapter.name}: {type(module).__name__} layers cannot follow a step schedule")
    dw = delta_tensor(adapter, original_weight.shape, multiplier, original=original_weight, dyn=dyn, dora=dora,
                      device=original_weight.device)
    db = None
    if adapter.has_bias:
        if bias is None:
            raise AdapterError(f"{adapter.name}: file has a bias delta but the layer has no bias")
        db = delta_tensor(adapter, bias.shape, multiplier, part="bias", device=bias.device)
    return DeltaOutput(module, dw, db)


class _Hook:
    """The one forward hook of a module, summing all of its terms whose gate is open."""

    def __init__(self, module: nn.Module):
        self.terms: list[_Term] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        for term in self.terms:
            f = term.gate.factor
            if f:
                output = term.add(output, x, f)
        return output


class Bypass:
    """The scheduled terms of one patcher, by module."""

    def __init__(self) -> None:
        self._hooks: dict[int, _Hook] = {}
        self.terms: dict[tuple, _Term] = {}

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def attach(self, module: nn.Module, term: _Term) -> None:
        hook = self._hooks.get(id(module))
        if hook is None:
            hook = self._hooks[id(module)] = _Hook(module)
        hook.terms.append(term)

    def remove(self) -> None:
        """Take every hook away (terms stay cached in ``terms`` until replaced)."""
        for hook in self._hooks.values():
            hook.handle.remove()
        self._hooks.clear()

    def sync(self, scheduled: list, originals: Callable[[Target], tuple[Tensor, Tensor | None]],
             bad: dict[str, list[str]], overflowing: dict[str, int], dora_fn) -> dict[str, int]:
        """Hook exactly the ``scheduled`` (contribution, gate) pairs, reusing terms
        whose inputs did not change; ``originals(target)`` gives the layer's weight and bias before any
        merge.  Layers that cannot be hooked go to ``bad``, those whose merged value would not be finite
        to ``overflowing``; returns the layers hooked per network."""
        hooked: dict[str, int] = {}
        old = self.terms
        self.remove()
        self.terms = {}
        for (target, adapter, mult, dyn, netname), gate in scheduled:
            key = (id(target), id(adapter), mult, dyn)
            term = old.get(key) if not adapter.needs_weight else None  # weight-dependent: always fresh
            if term is None:
                weight, bias = originals(target)
                try:
                    term = make_term(target, adapter, mult, dyn, weight, bias, dora_fn)
                    # hooked, it never writes the weight, but the layer's output must stay what a finite
                    # merged weight would give: the same check as merging
                    if isinstance(term, DeltaOutput):
                        merged = term.dw.float() + weight.float()
                    else:
                        merged = weight.to(torch.float32, copy=True)
                        adapter.add_delta_(merged, weight, mult, dyn=dyn, dora=dora_fn)
                except OOM:
                    raise
                except (AdapterError,) + MATH_ERRORS as e:
                    bad.setdefault(netname, []).append(error_text(e))
                    continue
                if not fits_dtype(merged, weight.dtype):
                    overflowing[netname] = overflowing.get(netname, 0) + 1
                    continue
            term.gate = gate
            self.terms[key] = term
            self.attach(target.module, term)
            hooked[netname] = hooked.get(netname, 0) + 1
        return hooked
