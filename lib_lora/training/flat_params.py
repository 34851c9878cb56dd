"""One flat buffer for a group of LoRA parameters: the optimiser sees one tensor, the layers their own.

A LoRA has two small tensors per layer (some 400 at SD sizes).  An optimiser step, a
``zero_grad`` and a gradient clip each pay per-tensor work (Python bookkeeping, one kernel or
more per tensor), which at SD sizes on a GPU, and on the CPU proxy, costs more than the update's
arithmetic.  ``flatten`` gives every parameter of a group storage in one flat Parameter, and
every gradient storage in that Parameter's ``.grad``: the layers read and autograd accumulates
into the same memory as before (``p.grad += new`` in place, since ``p.grad`` exists), and the
optimiser, the clip and the zeroing touch one tensor each.

Only an elementwise update may run on the flat tensor (AdamW: every element's step depends on
that element alone), and only for parameters that receive a gradient in every step (a zero
gradient is not the same as none: AdamW would still decay the weight).  ``state_dict`` and
``load_state_dict`` keep the saved optimiser state per original tensor, as before, so that a
state file does not depend on this layout and older ones load exactly (their continuation is not
bit-identical to a per-tensor run: one gradient clip norm over the flat buffer rounds differently).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_MEMBERS = "_lora_flat_members"     # attribute of a flat Parameter: the parameters it holds, in order
_VIEW = "_lora_flat_view"           # attribute of a member: its gradient is a view of the flat one


def flatten(params: list[nn.Parameter]) -> nn.Parameter:
    """A flat Parameter holding ``params`` (their values copied in), which become views of it, as their
    gradients become views of its gradient (zero now; zero it with ``zero_grads``)."""
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("flatten: the parameters must share one dtype and device")
    with torch.no_grad():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[i:i + n].view(p.shape)
        p.grad = flat.grad[i:i + n].view(p.shape)
        setattr(p, _VIEW, True)
        i += n
    setattr(flat, _MEMBERS, tuple(params))
    return flat


def members(p: Tensor) -> tuple[nn.Parameter, ...] | None:
    """The parameters a flat Parameter holds, or None for any other tensor."""
    return getattr(p, _MEMBERS, None)


def grads_are_views(p: Tensor) -> bool:
    """Whether ``p`` is a flat Parameter's member, whose ``.grad`` a backward may add to in place (the
    flat gradient is zeroed in place, never replaced, so the view stays the member's gradient)."""
    return getattr(p, _VIEW, False)


def zero_grads(opt: torch.optim.Optimizer) -> None:
    """``zero_grad(set_to_none=True)``, except that a flat Parameter's gradient is zeroed in place (its
    members' gradients are views of it)."""
    for g in opt.param_groups:
        for p in g["params"]:
            if members(p) is not None:
                p.grad.zero_()
            else:
                p.grad = None


def params(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors the optimiser updates (a flat Parameter stands for its members): what to clip or reduce."""
    return [p for g in opt.param_groups for p in g["params"]]


def state_dict(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` as it would be with every flat Parameter's members as parameters of their own."""
    sd = opt.state_dict()
    state, groups, index = {}, [], 0
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        ids = []
        for p, i in zip(group["params"], saved["params"]):
            parts = members(p) or (p,)
            st = sd["state"].get(i)
            offset = 0
            for m in parts:
                if st is not None:
                    state[index] = {k: _slice(v, p, offset, m) for k, v in st.items()}
                offset += m.numel()
                ids.append(index)
                index += 1
        groups.append({**saved, "params": ids})
    return {"state": state, "param_groups": groups}


def load_state_dict(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load what ``state_dict`` gave (or a per-tensor ``opt.state_dict()`` of the same parameters)."""
    state, groups, index = {}, [], 0
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        ids, it = [], iter(saved["params"])
        for p in group["params"]:
            parts = members(p)
            if parts is None:
                i = next(it)
                if i in sd["state"]:
                    state[index] = sd["state"][i]
            else:
                sts = [sd["state"].get(next(it)) for _ in parts]
                if any(s is not None for s in sts):
                    state[index] = _join(sts, parts)
            ids.append(index)
            index += 1
        if next(it, None) is not None:
            raise ValueError("the saved optimiser state has more parameters than this run's network")
        groups.append({**saved, "params": ids})
    opt.load_state_dict({"state": state, "param_groups": groups})


def _slice(v: Any, flat: Tensor, offset: int, m: Tensor) -> Any:
    """A flat Parameter's state entry for member ``m``: per-element state (exp_avg, ...) cut to its part, a
    scalar (step) copied (one tensor saved under many names is refused by safetensors)."""
    if not isinstance(v, Tensor) or members(flat) is None:
        return v
    if v.dim() > 0 and v.shape == flat.shape:
        return v[offset:offset + m.numel()].view(m.shape).clone()
    return v.clone()


def _join(sts: list[dict | None], parts: tuple[nn.Parameter, ...]) -> dict:
    """The flat Parameter's state entry from its members' (each member's per-element state, in order)."""
    if any(s is None for s in sts):
        raise ValueError("the saved optimiser state covers only some of a group's parameters")
    out = {}
    for k, v in sts[0].items():
        vs = [s.get(k) for s in sts]
        if isinstance(v, Tensor) and v.dim() > 0 and all(
                isinstance(x, Tensor) and x.shape == m.shape for x, m in zip(vs, parts)):
            out[k] = torch.cat([x.reshape(-1) for x in vs])
        elif all(_same(x, v) for x in vs):
            out[k] = v
        else:
            raise ValueError(f"the saved optimiser state's {k!r} differs between the tensors of one group")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b
