"""A frozen layer and its trainable LoRA as one forward and one autograd node.

A forward hook costs a slow-path module call per layer, and a LoRA built from its own
``Linear`` modules costs two more calls and some eight autograd nodes (down, scale, up,
their transposes and casts, the sum of the input's two gradients).  At SD sizes on a GPU a
step is bound by that per-op overhead, not by arithmetic.  ``lora_forward`` gives a layer an
instance forward (``instance_forward.py``: the class and its other instances are untouched,
and deleting it restores the layer exactly) that computes

    y = x W^T + b + s (x D^T) U^T        (s = multiplier * alpha / rank)

in one ``autograd.Function`` whose backward writes the input's gradient once and the LoRA's
gradients directly: where they are views of the trainer's flat buffer (flat_params.py), the
backward adds them there itself (one GEMM each), so the LoRA's tensors are no inputs of the node
and autograd runs no accumulation node for them.  It keeps what the separate modules kept (the
input, read by D's gradient, and the rank-wide ``x D^T``), and never the input a second time for
the frozen weight.  A 1x1 convolution (SD1.5's ``proj_in``/``proj_out``) is the same product over
the channels, batched over the images.

Other convolutions (LoCon's 3x3), a LoRA with dropout while training, and a layer whose class
does more than torch's math (a subclass, or the WebUI's built-in Lora patching
``Linear``/``Conv2d.forward`` at class level) run the layer's own forward with the LoRA added
after it, as a hook would, minus the hook.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters.lora import LoRAModule
from .. import autocast
from . import flat_params
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


# The one input that needs a gradient for a layer whose backward adds the LoRA's gradients into
# their ``.grad`` itself (``GRADS_IN_PLACE``); its own gradient is always None.
_ANCHOR = torch.zeros((), requires_grad=True)

# whether the LoRA's gradients go straight into a flat buffer's views (flat_params.py) from the
# backward; the benchmark turns this off to measure what it saves
GRADS_IN_PLACE = True
# whether a batch through a 1x1 convolution takes batched products here (else the layer's own conv and
# the LoRA's modules beside it); the benchmark turns this off to measure it
BATCHED_POINTWISE = True


def _grad_into(p: Tensor, a: Tensor, b: Tensor, s: float) -> None:
    """``p.grad += s * (a @ b)``, as autograd accumulates a returned gradient: one GEMM into the gradient
    where the product's dtype is the gradient's, else the product added with a cast (half product, fp32 LoRA)."""
    g = p.grad
    if g is None:
        p.grad = _mm_scaled(a, b, s).view(p.shape).to(p.dtype)
        return
    if g.dim() != 2:                        # a 1x1 conv's (r, C, 1, 1)
        g = g.view(a.shape[0], b.shape[1])
    if g.dtype == a.dtype:
        g.addmm_(a, b, alpha=s)
    else:
        g.add_(_mm_scaled(a, b, s))


def _grad_add(p: Tensor, t: Tensor, s: float) -> None:
    """``p.grad += s * t`` (``t`` a finished product, cast where its dtype is not the gradient's)."""
    if p.grad is None:
        p.grad = (t * s).view(p.shape).to(p.dtype)
    else:
        p.grad.view(t.shape).add_(t, alpha=s)


def _edges(down: Tensor, up: Tensor) -> tuple[Tensor | None, Tensor | None, tuple | None]:
    """The node's inputs standing for the LoRA's tensors, and the Parameters whose ``.grad`` the backward
    adds to itself with their transposes, ``(D, U, D^T, U^T)`` (None: it returns their gradients to autograd)."""
    if not down.requires_grad:
        return None, None, None
    if GRADS_IN_PLACE and flat_params.grads_are_views(down) and flat_params.grads_are_views(up):
        with torch.no_grad():   # their transposes too, bound once: views of the flat buffer, as they are
            return _ANCHOR, None, (down, up, down.flatten(1).t(), up.flatten(1).t())
    return down, up, None


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x D^T) U^T`` over the last dimension.

    ``gd``/``gu``: D and U, whose gradients the backward returns, or ``_ANCHOR`` and None when it adds
    them into the Parameters ``into`` itself; ``k``: W, b, D, U, s and the dtype to cast all to first (or None).
    """

    @staticmethod
    def forward(ctx, x: Tensor, gd: Tensor | None, gu: Tensor | None, k: tuple, into: tuple | None):
        weight, bias, down, up, scale, dt = k
        x2 = x.reshape(-1, x.shape[-1])
        if dt is not None:
            x2, weight, bias, down, up = _to(x2, dt), _to(weight, dt), _to(bias, dt), _to(down, dt), _to(up, dt)
            dT, uT = down.t(), up.t()
        elif into is not None:
            dT, uT = into[2], into[3]       # bound once (views: they follow every update in place)
        else:
            dT, uT = down.t(), up.t()
        out = F.linear(x2, weight, bias)
        h = torch.mm(x2, dT)
        out.addmm_(h, uT, alpha=scale)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x2, h)
        ctx.k, ctx.into, ctx.x_shape = (weight, down, up, scale), into, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, d, u, s = ctx.k
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g, u)                                   # the rank-wide gradient, before the scale
        gx = gd = gu = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, w).addmm_(gh, d, alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x2, h = ctx.saved_tensors
            if ctx.into is None:
                # autograd casts each gradient to its input's dtype (a half product's to the fp32 LoRA)
                gd, gu = _mm_scaled(gh.t(), x2, s), _mm_scaled(g.t(), h, s)
            else:
                _grad_into(ctx.into[0], gh.t(), x2, s)
                _grad_into(ctx.into[1], g.t(), h, s)
        return gx, gd, gu, None, None


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b[i]`` for each image i of a batch: one batched GEMM with ``a`` broadcast (no copy)."""
    return torch.bmm(a.expand(b.shape[0], *a.shape), b)


class _LoraPointwise(torch.autograd.Function):
    """The same for a 1x1 convolution (B, C, H, W): ``W x + b + s U (D x)`` over the channels of each image.

    One image is one matrix product per term; a batch one batched product per term, the weights
    broadcast, with the LoRA's weight gradients summed over its images.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gd: Tensor | None, gu: Tensor | None, k: tuple, into: tuple | None):
        weight, bias, down, up, scale, dt = k
        n = x.shape[0]
        xm = x.reshape(x.shape[1], -1) if n == 1 else x.reshape(n, x.shape[1], -1)    # (C, HW) or (B, C, HW)
        weight, down, up = weight.flatten(1), down.flatten(1), up.flatten(1)
        if dt is not None:
            xm, weight, bias, down, up = _to(xm, dt), _to(weight, dt), _to(bias, dt), _to(down, dt), _to(up, dt)
        if n == 1:
            out = torch.mm(weight, xm) if bias is None else torch.addmm(bias[:, None], weight, xm)
            h = torch.mm(down, xm)
            out.addmm_(up, h, alpha=scale)
        else:
            out = _bmm(weight, xm)
            if bias is not None:
                out.add_(bias[:, None])
            h = _bmm(down, xm)
            out.baddbmm_(up.expand(n, *up.shape), h, alpha=scale)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(xm, h)
        ctx.k, ctx.into, ctx.x_shape = (weight, down, up, scale), into, x.shape
        return out.view(n, out.shape[-2], *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, d, u, s = ctx.k
        n = grad.shape[0]
        gx = gd = gu = None
        if n == 1:
            g = grad.reshape(grad.shape[1], -1)
            gh = torch.mm(u.t(), g)
            if ctx.needs_input_grad[0]:
                gx = torch.mm(w.t(), g).addmm_(d.t(), gh, alpha=s).view(ctx.x_shape)
        else:
            g = grad.reshape(n, grad.shape[1], -1)
            gh = _bmm(u.t(), g)
            if ctx.needs_input_grad[0]:
                gx = _bmm(w.t(), g).baddbmm_(d.t().expand(n, *d.t().shape), gh, alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            xm, h = ctx.saved_tensors
            if n == 1:
                pd, pu = (gh, xm.t()), (g, h.t())
            else:   # summed over the images: (B, r, C) and (B, O, r) products, far smaller than the activations
                pd = torch.bmm(gh, xm.transpose(1, 2)).sum(0), None
                pu = torch.bmm(g, h.transpose(1, 2)).sum(0), None
            if ctx.into is None:
                gd, gu = (_mm_scaled(a, b, s) if b is not None else a * s for a, b in (pd, pu))
                gd, gu = gd.view(*gd.shape, 1, 1), gu.view(*gu.shape, 1, 1)
            else:
                for p, (a, b) in zip(ctx.into, (pd, pu)):
                    if b is not None:
                        _grad_into(p, a, b, s)
                    else:
                        _grad_add(p, a, s)
        return gx, gd, gu, None, None


def _fused(layer: nn.Module, lora: LoRAModule) -> Callable[[nn.Module, Tensor], Tensor]:
    # Everything that cannot change while the layer is attached is read here, once: the forward
    # runs for every LoRA'd layer in every step, where each attribute lookup and branch adds up.
    pointwise = isinstance(layer, nn.Conv2d)
    amp = _amp_query(layer.weight.device.type)
    apply = (_LoraPointwise if pointwise else _LoraLinear).apply
    down, up = lora.down.weight, lora.up.weight     # the Parameters themselves, updated in place
    scale, dropout = lora.scale, lora.dropout > 0

    edges: list = []    # _edges once the gradients go in place, which they then do for good

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        params = self._parameters           # what ``self.weight`` finds, without Module.__getattr__
        w, b = params["weight"], params["bias"]
        if (dropout and lora.training) or w.requires_grad or (b is not None and b.requires_grad) \
                or (pointwise and not BATCHED_POINTWISE and x.shape[0] != 1):
            return lora.add_to(type(self).forward(self, x), x)
        dt = amp()
        if dt is None and not (x.dtype == w.dtype == down.dtype):
            dt = w.dtype    # outside autocast: the layer's own dtype, as the modules computed
        if edges and GRADS_IN_PLACE and down.requires_grad:
            gd, gu, into = edges[0]
        else:
            gd, gu, into = e = _edges(down, up)
            if into is not None:
                edges.append(e)
        return apply(x, gd, gu, (w, b, down, up, lora.multiplier * scale, dt), into)
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
