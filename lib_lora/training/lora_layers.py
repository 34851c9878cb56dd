"""A frozen layer and its trainable LoRA as one forward and one autograd node.

A forward hook costs a slow-path module call per layer, and a LoRA built from its own
``Linear`` modules costs two more calls and some eight autograd nodes (down, scale, up,
their transposes and casts, the sum of the input's two gradients).  At SD sizes on a GPU a
step is bound by that per-op overhead, not by arithmetic.  ``lora_forward`` gives a layer an
instance forward (``instance_forward.py``: the class and its other instances are untouched,
and deleting it restores the layer exactly) that computes

    y = x W^T + b + s (x D^T) U^T        (s = multiplier * alpha / rank)

in one ``autograd.Function`` whose backward writes the input's gradient once and the LoRA's
gradients directly.  It keeps what the separate modules kept (the input, read by D's
gradient, and the rank-wide ``x D^T``), and never the input a second time for the frozen
weight.  A 1x1 convolution of one image (SD1.5's ``proj_in``/``proj_out``) is the same
product over the channels.

Other convolutions (LoCon's 3x3), a batch through a 1x1 convolution, a LoRA with dropout
while training, and a layer whose class does more than torch's math (a subclass, or the
WebUI's built-in Lora patching ``Linear``/``Conv2d.forward`` at class level) run the layer's
own forward with the LoRA added after it, as a hook would, minus the hook.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters.lora import LoRAModule
from .. import autocast
from .frozen_layers import runs_torch_forward


def _amp_query(device_type: str) -> Callable[[], torch.dtype | None]:
    """A cheap per-call question: the autocast dtype for tensors on ``device_type``, or None when autocast is off."""
    if autocast.BY_DEVICE_TYPE:
        return lambda: torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    def query() -> torch.dtype | None:     # torch 2.1: one function per device kind
        _, dtype, on = autocast.autocast_state(device_type)
        return dtype if on else None
    return query


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _mm_scaled(a: Tensor, b: Tensor, s: float) -> Tensor:
    """``s * (a @ b)`` with the scale inside the product (BLAS's alpha; beta 0 reads no input)."""
    return torch.mm(a, b) if s == 1 else torch.addmm(a.new_empty(()), a, b, beta=0, alpha=s)


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x D^T) U^T`` over the last dimension; ``dt``: cast everything to it first (or None)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float,
                dt: torch.dtype | None):
        x2 = x.reshape(-1, x.shape[-1])
        if dt is not None:
            x2, weight, bias, down, up = _to(x2, dt), _to(weight, dt), _to(bias, dt), _to(down, dt), _to(up, dt)
        out = F.linear(x2, weight, bias)
        h = torch.mm(x2, down.t())
        out.addmm_(h, up.t(), alpha=scale)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, h, weight, down, up)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, h, w, d, u = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g, u)                                   # the rank-wide gradient, before the scale
        gx = gd = gu = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, w).addmm_(gh, d, alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            gd = _mm_scaled(gh.t(), x2, s)
        if ctx.needs_input_grad[4]:
            gu = _mm_scaled(g.t(), h, s)
        # autograd casts each gradient to its input's dtype (a half product's to the fp32 LoRA)
        return gx, None, None, gd, gu, None, None


class _LoraPointwise(torch.autograd.Function):
    """The same for a 1x1 convolution of one image (C, H, W): ``W x + b + s U (D x)`` over the channels."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float,
                dt: torch.dtype | None):
        x2 = x.reshape(x.shape[1], -1)                      # (C, H*W)
        weight, down, up = weight.flatten(1), down.flatten(1), up.flatten(1)
        if dt is not None:
            x2, weight, bias, down, up = _to(x2, dt), _to(weight, dt), _to(bias, dt), _to(down, dt), _to(up, dt)
        out = torch.mm(weight, x2) if bias is None else torch.addmm(bias[:, None], weight, x2)
        h = torch.mm(down, x2)
        out.addmm_(up, h, alpha=scale)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, h, weight, down, up)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(1, out.shape[0], *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, h, w, d, u = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(grad.shape[1], -1)
        gh = torch.mm(u.t(), g)
        gx = gd = gu = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(w.t(), g).addmm_(d.t(), gh, alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            gd = _mm_scaled(gh, x2.t(), s)
            gd = gd.view(*gd.shape, 1, 1)
        if ctx.needs_input_grad[4]:
            gu = _mm_scaled(g, h.t(), s)
            gu = gu.view(*gu.shape, 1, 1)
        return gx, None, None, gd, gu, None, None


def _fused(layer: nn.Module, lora: LoRAModule) -> Callable[[nn.Module, Tensor], Tensor]:
    # Everything that cannot change while the layer is attached is read here, once: the forward
    # runs for every LoRA'd layer in every step, where each attribute lookup and branch adds up.
    pointwise = isinstance(layer, nn.Conv2d)
    amp = _amp_query(layer.weight.device.type)
    apply = (_LoraPointwise if pointwise else _LoraLinear).apply
    down, up = lora.down.weight, lora.up.weight     # the Parameters themselves, updated in place
    scale, dropout = lora.scale, lora.dropout > 0

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if (dropout and lora.training) or w.requires_grad or (b is not None and b.requires_grad) \
                or (pointwise and x.shape[0] != 1):
            return lora.add_to(type(self).forward(self, x), x)
        dt = amp()
        if dt is None and not (x.dtype == w.dtype == down.dtype):
            dt = w.dtype    # outside autocast: the layer's own dtype, as the modules computed
        return apply(x, w, b, down, up, lora.multiplier * scale, dt)
    return forward


def _beside(lora: LoRAModule) -> Callable[[nn.Module, Tensor], Tensor]:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return lora.add_to(type(self).forward(self, x), x)
    return forward


def _pointwise(layer: nn.Module) -> bool:
    return (runs_torch_forward(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.dilation == (1, 1) and layer.groups == 1 and layer.padding == (0, 0))


def lora_forward(layer: nn.Module, lora: LoRAModule) -> Callable[[nn.Module, Tensor], Tensor]:
    """The instance forward that runs ``layer`` with ``lora`` beside it (unbound: ``forward(layer, x)``)."""
    return _fused(layer, lora) if runs_torch_forward(layer, nn.Linear) or _pointwise(layer) else _beside(lora)
