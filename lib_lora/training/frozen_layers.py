"""Frozen convolutions and linears that keep less for backward, and skip oneDNN where it is slow.

A LoRA step needs the gradient *through* every frozen layer but never the gradient *of* its
weight.  Autograd's convolution still keeps each layer's input for a weight gradient nobody
asks for; ``frozen_layers`` gives the frozen ``Conv2d`` instances under a model a forward
whose backward keeps only the weight (a Parameter, so keeping it is free).  In an SD UNet
that frees the input of every resnet convolution: the largest activations of the step.
Current torch's linear already keeps no input when its weight is frozen; where a torch does
(checked once, ``_autograd_keeps_linear_input``), frozen ``Linear`` layers get the same treatment.
A LoRA beside a layer still keeps the same input for its own weight gradient, so nothing
is recomputed and gradients are exactly autograd's.

Second, on CPU a 3x3 convolution with few output positions and many channels (SD's 8x8 and
16x16 levels at batch 1) is bound by reading its weight, and oneDNN re-lays the weight out on
every call.  There the forward and the input gradient are done as one matrix product against
the unfold-ed input instead (``_use_gemm``; benchmarks/train.py measures it, the README gives the
figures).  The choice depends only on shapes, so a run and its resume pick the same kernels.

Third, two cheap element-wise pairs are recomputed in backward instead of kept (selective
checkpointing): GroupNorm -> SiLU at the head of an LDM/SGM resnet ``nn.Sequential`` keeps only
its input, not the normalised tensor; GEGLU's ``a * gelu(gate)`` keeps the projection, not
``gelu(gate)`` as well.  Recomputing them costs a few percent of a step's time.  Their outputs
are often kept all the same, by the LoRA of the next layer (GEGLU feeds the FeedForward's
output Linear; LoCon adapts the conv after GroupNorm -> SiLU): ``_Rebuild`` hands autograd a
recipe instead of the tensor whenever it saves one of those outputs, and rebuilds it from the
kept input in backward.

Fourth, a frozen LayerNorm keeps its output instead of its input (apex's "memory efficient"
LayerNorm): backward gets the normalised input back as ``(y - bias) / weight``.  Its output
is what the LoRAs on q/k/v and on the FeedForward keep anyway, so the input is one tensor
fewer per norm.  Only where no weight element is zero, which is checked once.

Only while grad mode is on: sampling in the middle of training runs the layers' own forward.
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from functools import lru_cache, partial
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torch.utils.checkpoint import checkpoint

from ..autocast import autocast_state
from ..instance_forward import instance_forward

# GEGLU classes whose forward is exactly ``a, gate = proj(x).chunk(2, -1); a * gelu(gate)``
_GEGLU_MODULES = ("ldm.modules.attention", "sgm.modules.attention")


def _use_gemm(x: Tensor, weight: Tensor, out_hw: tuple[int, int], groups: int) -> bool:
    """Weight-bound 3x3 (or larger) CPU conv: the weight outweighs the output positions 4:1."""
    kh, kw = weight.shape[2:]
    positions = x.shape[0] * out_hw[0] * out_hw[1]
    return x.device.type == "cpu" and groups == 1 and kh * kw > 1 and weight.shape[0] >= 4 * positions


def _out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2))  # type: ignore[return-value]


def _as(weight: Tensor, grad: Tensor) -> Tensor:
    # Under autocast the forward ran in half precision but backward runs outside autocast: the
    # fp32 weight meets a half gradient (autograd casts the returned input gradient back itself).
    return weight if weight.dtype == grad.dtype else weight.to(grad.dtype)


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
        out_hw = _out_hw(x, weight, stride, padding, dilation)
        gemm = _use_gemm(x, weight, out_hw, groups)
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups, gemm)
        if not gemm:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        n = x.shape[0]
        cols = F.unfold(x, weight.shape[2:], dilation, padding, stride)              # (N, C*k*k, L)
        cols = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*k*k, N*L)
        # one 2-D product reads the weight once (a batched matmul against a 2-D weight may copy it)
        out = torch.mm(weight.flatten(1), cols) if bias is None else torch.addmm(bias[:, None], weight.flatten(1), cols)
        out = out.view(weight.shape[0], n, -1).transpose(0, 1) if n > 1 else out[None]
        return out.reshape(n, weight.shape[0], *out_hw)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        weight = _as(weight, grad)
        shape, stride, padding, dilation, groups, gemm = ctx.conf
        if gemm:
            n = grad.shape[0]
            g = grad.reshape(n, grad.shape[1], -1)
            g = g[0] if n == 1 else g.transpose(0, 1).reshape(grad.shape[1], -1)          # (O, N*L)
            gcols = torch.mm(weight.flatten(1).t(), g)                                      # (C*k*k, N*L)
            gcols = gcols[None] if n == 1 else gcols.view(gcols.shape[0], n, -1).transpose(0, 1)
            gx = F.fold(gcols, shape[2:], weight.shape[2:], dilation, padding, stride)
        else:
            placeholder = grad.new_empty(1).expand(shape)   # only its shape is read
            gx = torch.ops.aten.convolution_backward(grad, placeholder, weight, None, stride, padding, dilation,
                                                     False, [0, 0], groups, (True, False, False))[0]
        return gx, None, None, None, None, None, None


def _weight_left(x: Tensor) -> bool:
    """A CPU product of at most 64 rows (SD's 8x8 and 4x4 levels at batch 1) against a frozen weight."""
    return x.device.type == "cpu" and x.numel() <= 64 * x.shape[-1]


@lru_cache(maxsize=None)
def _autograd_keeps_linear_input() -> bool:
    """Whether this torch's linear keeps its input for backward when only that input needs a gradient."""
    x = torch.zeros(3, 2, requires_grad=True)
    kept: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        F.linear(x, torch.zeros(2, 2))
    return any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)


class _FrozenLinear(torch.autograd.Function):
    # With few rows the product is bound by reading the weight, and MKL reads it faster as the
    # left operand (benchmarks/train.py measures it, forward and backward).  The transposed result
    # is only rows-wide, so making it contiguous again is cheap.
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        ctx.save_for_backward(weight)
        if not _weight_left(x):
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1]).t()
        out = torch.mm(weight, x2) if bias is None else torch.addmm(bias[:, None], weight, x2)
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        weight = _as(weight, grad)
        if not _weight_left(grad):
            return grad @ weight, None, None
        gx = torch.mm(weight.t(), grad.reshape(-1, grad.shape[-1]).t())
        return gx.t().contiguous().view(*grad.shape[:-1], weight.shape[1]), None, None


class _FrozenLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...], eps: float):
        y, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(y, rstd, weight, bias)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, rstd, weight, bias = ctx.saved_tensors
        # at least fp32 throughout: under autocast y and grad are half while weight, bias and rstd
        # are fp32 (the forward ran aten's mixed-precision kernel); the result goes back to y's dtype
        dt = torch.promote_types(y.dtype, torch.float32)
        x_hat = y.to(dt) if bias is None else y.to(dt) - bias.to(dt)
        if weight is not None:
            x_hat = x_hat / weight.to(dt)
        # aten's backward for an input that is already normalised (mean 0, rstd 1), scaled by the
        # real rstd afterwards: one fused kernel, as for the unmodified LayerNorm
        gx = torch.ops.aten.native_layer_norm_backward(
            grad.to(dt), x_hat, ctx.shape, torch.zeros_like(rstd, dtype=dt), torch.ones_like(rstd, dtype=dt),
            None if weight is None else weight.to(dt), None, [True, False, False])[0]
        return gx.mul_(rstd.to(dt)).to(y.dtype), None, None, None, None


def _is_frozen(m: nn.Module) -> bool:
    return (not any(p is not None and p.requires_grad for p in (m.weight, m.bias))
            and not torch.nn.utils.parametrize.is_parametrized(m))


def _conv_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad and _is_frozen(self)):
        return type(self).forward(self, x)
    return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad and _is_frozen(self)):
        return type(self).forward(self, x)
    return _FrozenLinear.apply(x, self.weight, self.bias)


def _layer_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad and _is_frozen(self)):
        return type(self).forward(self, x)
    return _FrozenLayerNorm.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)


def runs_torch_forward(m: nn.Module, cls: type) -> bool:
    # Exact classes running torch's own forward only: a subclass, or a class-level patch such as
    # the WebUI built-in Lora's, may do more in forward than the math this replaces.
    return (type(m) is cls and getattr(cls.forward, "__module__", "").startswith("torch.")
            and isinstance(getattr(m, "weight", None), nn.Parameter)   # LayerNorm: elementwise_affine
            and getattr(m, "padding_mode", "zeros") == "zeros" and not isinstance(getattr(m, "padding", 0), str))


class _Rebuild:
    """Saved-tensor hooks that swap a registered output for (recipe, input) and rebuild it in backward.

    Lookup is by storage, so a view of the output (``F.linear`` saves its input reshaped to 2-D)
    is found too.  A registration dies with its tensor, and an in-place change to the output
    or to its input since registration means the tensor is kept as usual.  The recipe runs
    under the autocast state of the forward, as ``checkpoint`` does.
    """

    def __init__(self) -> None:
        self._by_storage: dict[int, tuple] = {}

    def register(self, out: Tensor, fn: Callable[[Tensor], Tensor], src: Tensor) -> None:
        key = out.untyped_storage().data_ptr()
        amp = autocast_state(src.device.type)
        by_storage = self._by_storage

        def forget(r: weakref.ref, k: int = key) -> None:
            if by_storage.get(k, (None,))[0] is r:
                del by_storage[k]

        by_storage[key] = (weakref.ref(out, forget), out._version, fn, src, src._version, amp)

    def pack(self, t: Tensor):
        entry = self._by_storage.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if entry is None:
            return t
        ref, version, fn, src, src_version, amp = entry
        if ref() is None or t._version != version or src._version != src_version:
            return t
        return fn, src, src_version, amp, t.size(), t.stride(), t.storage_offset()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        fn, src, src_version, (dev, dtype, enabled), size, stride, offset = packed
        if src._version != src_version:
            raise RuntimeError("an input kept to rebuild a saved activation was modified in place")
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            return fn(src.detach()).as_strided(size, stride, offset)


def _norm_act(norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    return act(norm(x))


def _norm_act_head_forward(self: nn.Sequential, x: Tensor, rebuild: _Rebuild) -> Tensor:
    """GroupNorm -> SiLU -> rest, keeping only the GroupNorm's input for the first two."""
    norm, act = self[0], self[1]
    if not (torch.is_grad_enabled() and x.requires_grad and not any(p.requires_grad for p in norm.parameters())):
        return type(self).forward(self, x)
    h = checkpoint(_norm_act, norm, act, x, use_reentrant=False)
    rebuild.register(h, partial(_norm_act, norm, act), x)   # for a LoCon on the conv that follows
    for m in list(self)[2:]:
        h = m(h)
    return h


def _gate(h: Tensor) -> Tensor:
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def _geglu_forward(self: nn.Module, x: Tensor, rebuild: _Rebuild) -> Tensor:
    h = self.proj(x)
    if not (torch.is_grad_enabled() and h.requires_grad):
        return _gate(h)
    out = checkpoint(_gate, h, use_reentrant=False)
    rebuild.register(out, _gate, h)   # for the LoRA on the FeedForward's output Linear
    return out


def _norm_act_head(m: nn.Module) -> bool:
    return (type(m) is nn.Sequential and len(m) >= 2 and isinstance(m[0], nn.GroupNorm)
            and type(m[1]) is nn.SiLU)


# a conv or linear weight of this many elements marks a model of SD's widths (the narrowest SD1.5
# 3x3 conv has 0.9 M); the tests' tiny models and benchmarks/train.py's per-op-bound proxy stay below
SD_SIZED_WEIGHT = 2**20


def lean_by_default(device: torch.device, unet: nn.Module) -> bool:
    """``lean_frozen_layers`` when the user leaves it unset: on CPU, for a model of SD's widths.

    On a GPU a step at SD sizes is bound by per-op overhead, which the wrappers add to; so is a CPU
    step at toy widths, where what they save is small.
    """
    return device.type == "cpu" and any(
        isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() >= SD_SIZED_WEIGHT for m in unet.modules())


@contextmanager
def frozen_layers(*roots: nn.Module) -> Iterator[int]:
    """Lean forwards for the frozen layers under ``roots`` (see the module docstring); yields how many."""
    mods = [m for r in roots for m in r.modules()]
    convs = [m for m in mods if runs_torch_forward(m, nn.Conv2d)]
    # elsewhere than on CPU (the weight-left products) a frozen linear only needs us where autograd
    # would keep its input: otherwise the wrapper is per-op overhead and nothing else
    linears = [m for m in mods if runs_torch_forward(m, nn.Linear)
               and (m.weight.device.type == "cpu" or _autograd_keeps_linear_input())]
    heads = [m for m in mods if _norm_act_head(m)]
    gegl = [m for m in mods if type(m).__name__ == "GEGLU" and type(m).__module__ in _GEGLU_MODULES]
    norms = [m for m in mods if runs_torch_forward(m, nn.LayerNorm) and bool((m.weight != 0).all())]
    rebuild = _Rebuild()
    with ExitStack() as stack:
        n = sum(stack.enter_context(instance_forward(ms, fwd)) for ms, fwd in (
            (convs, _conv_forward), (linears, _linear_forward), (norms, _layer_norm_forward),
            (heads, _with(_norm_act_head_forward, rebuild)), (gegl, _with(_geglu_forward, rebuild))))
        if n:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(rebuild.pack, rebuild.unpack))
        yield n


def _with(forward: Callable, rebuild: _Rebuild) -> Callable:
    return lambda self, x: forward(self, x, rebuild)
