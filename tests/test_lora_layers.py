"""lora_layers: a frozen layer and its LoRA in one forward give what autograd gives for
``layer(x) + s * up(down(x))``, and leave nothing behind."""
from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lib_lora.adapters.lora import LoRAModule
from lib_lora.training.lora_layers import lora_forward
from lib_lora.modelmap import ModelMap
from lib_lora.training.network import NetworkConfig, TrainingNetwork
from test_frozen_layers import _lora_grads
from tiny_models import build_sd1, build_sd2, build_sdxl


def _layer_and_lora(layer: nn.Module, alpha: float = 2.0, rank: int = 4) -> LoRAModule:
    torch.manual_seed(0)
    layer.requires_grad_(False)
    lora = LoRAModule("l", layer, layer.weight.shape, rank=rank, alpha=alpha)
    nn.init.normal_(lora.up.weight)
    return lora


def _reference(layer: nn.Module, lora: LoRAModule, x: Tensor) -> Tensor:
    """Plain autograd: the layer's own forward plus the LoRA branch spelled out in functional ops."""
    s = lora.multiplier * lora.alpha / lora.rank
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias) + s * F.linear(F.linear(x, lora.down.weight), lora.up.weight)
    h = F.conv2d(x, lora.down.weight, None, layer.stride, layer.padding, layer.dilation)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation) \
        + s * F.conv2d(h, lora.up.weight)


def _outputs_and_grads(fn, x: Tensor, lora: LoRAModule, amp: torch.dtype | None = None):
    params = [lora.down.weight, lora.up.weight] + ([x] if x.requires_grad else [])
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    return y, torch.autograd.grad(y, params, g)


@pytest.mark.parametrize("layer,shape", [
    (nn.Linear(24, 40), (2, 7, 24)),               # tokens: the transformer's projections
    (nn.Linear(24, 40, bias=False), (7, 24)),
    (nn.Conv2d(24, 40, 1), (1, 24, 5, 6)),         # SD1.5's proj_in / proj_out, one image: matrix products
    (nn.Conv2d(24, 40, 1), (3, 24, 5, 6)),         # a batch: batched products, the LoRA's gradients summed
    (nn.Conv2d(24, 40, 3, stride=2, padding=1), (2, 24, 9, 9)),   # LoCon on a resnet conv
])
@pytest.mark.parametrize("x_grad", [True, False])
def test_one_forward_equals_autograd(layer, shape, x_grad):
    lora = _layer_and_lora(layer)
    lora.multiplier = 0.75
    x = torch.randn(shape, requires_grad=x_grad)
    fwd = types.MethodType(lora_forward(layer, lora), layer)
    y, grads = _outputs_and_grads(fwd, x, lora)
    y_ref, ref = _outputs_and_grads(lambda t: _reference(layer, lora, t), x, lora)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(layer)    # nothing was bound to the layer itself


@pytest.mark.parametrize("layer,shape", [(nn.Linear(24, 40), (2, 7, 24)), (nn.Conv2d(24, 40, 1), (1, 24, 5, 6)),
                                         (nn.Conv2d(24, 40, 1), (3, 24, 5, 6))])
@pytest.mark.parametrize("torch_2_1", [False, True])   # the autocast queries of the WebUI's torch
def test_under_autocast_the_product_is_half_and_the_lora_gradients_fp32(layer, shape, torch_2_1, monkeypatch):
    if torch_2_1:
        monkeypatch.setattr("lib_lora.autocast.BY_DEVICE_TYPE", False)
    lora = _layer_and_lora(layer)
    x = torch.randn(shape, requires_grad=True)       # fp32 input (a LayerNorm's output under autocast)
    fwd = types.MethodType(lora_forward(layer, lora), layer)
    y, grads = _outputs_and_grads(fwd, x, lora, amp=torch.bfloat16)
    y_ref, ref = _outputs_and_grads(lambda t: _reference(layer, lora, t), x, lora, amp=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.05 * y_ref.abs().max().item())
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_a_class_level_forward_patch_still_runs(monkeypatch):
    """The WebUI's built-in Lora replaces ``Linear.forward`` on the class: that forward keeps running,
    with our LoRA added after it."""
    calls = []
    torch_forward = nn.Linear.forward

    def patched(self, x):          # stands in for the built-in's network_Linear_forward
        calls.append(self)         # which changes only the layers it named (ours are not)
        return torch_forward(self, x) * (2 if hasattr(self, "network_layer_name") else 1)

    patched.__module__ = "extensions-builtin.Lora.networks"
    monkeypatch.setattr(nn.Linear, "forward", patched)
    layer = nn.Linear(8, 8)
    layer.network_layer_name = "named"
    lora = _layer_and_lora(layer)
    x = torch.randn(3, 8)
    y = lora_forward(layer, lora)(layer, x)
    assert [c for c in calls if c is layer] == [layer]
    s = lora.alpha / lora.rank
    torch.testing.assert_close(y, 2 * F.linear(x, layer.weight, layer.bias)
                               + s * F.linear(F.linear(x, lora.down.weight), lora.up.weight))


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
def test_a_unet_gives_the_gradients_of_forward_hooks(build, monkeypatch):
    """Through a whole UNet (LoRA and LoCon), one forward per layer and a hook beside each layer
    (the modules' own autograd) give the same loss and gradients."""
    tiny = build()
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    monkeypatch.setattr(TrainingNetwork, "one_forward", False)
    loss_ref, ref, _ = _lora_grads(tiny, lean=False, batch=1)
    monkeypatch.setattr(TrainingNetwork, "one_forward", True)
    loss, got, _ = _lora_grads(tiny, lean=False, batch=1)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not [m for m in tiny.unet.modules() if "forward" in vars(m) or m._forward_hooks]
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items())


def test_a_layer_with_an_instance_forward_of_its_own_keeps_it():
    tiny = build_sd2()
    layer = tiny.unet.input_blocks[1][1].proj_in
    own = types.MethodType(lambda self, x: type(self).forward(self, x), layer)
    layer.forward = own
    net = TrainingNetwork(ModelMap.build("sd2", tiny.unet, []), NetworkConfig(rank=4, alpha=4, train_text_encoder=False))
    net.attach()
    try:
        assert layer.forward is own and len(layer._forward_hooks) == 1
        assert "forward" in vars(tiny.unet.input_blocks[1][1].proj_out)
    finally:
        net.detach()
    assert layer.forward is own and not layer._forward_hooks
    assert "forward" not in vars(tiny.unet.input_blocks[1][1].proj_out)


@pytest.mark.parametrize("layer,shape", [(nn.Linear(24, 40), (2, 7, 24)), (nn.Conv2d(24, 40, 1), (1, 24, 5, 6)),
                                         (nn.Conv2d(24, 40, 1), (3, 24, 5, 6))])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_gradients_into_a_flat_buffer_are_autograds(layer, shape, in_place, amp, monkeypatch):
    """With the LoRA's gradients views of one flat buffer (the trainer's AdamW), two backwards
    accumulate there what autograd gives for the plain formula, whether the backward adds them
    into the buffer itself (no autograd node of theirs) or returns them; under autocast the half
    products are added into the fp32 buffer."""
    from lib_lora.training import flat_params, lora_layers

    monkeypatch.setattr(lora_layers, "GRADS_IN_PLACE", in_place)
    lora = _layer_and_lora(layer)
    x = torch.randn(shape, requires_grad=True)
    _, ref = _outputs_and_grads(lambda t: _reference(layer, lora, t), x, lora, amp=amp)
    flat = flat_params.flatten([lora.down.weight, lora.up.weight])
    fwd = types.MethodType(lora_forward(layer, lora), layer)
    for _ in range(2):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = fwd(x)
        assert type(y.grad_fn).__name__ in ("_LoraLinearBackward", "_LoraPointwiseBackward")
        # the LoRA's tensors are inputs of the layer's node only when autograd accumulates their gradients
        assert (y.grad_fn.next_functions[1][0].variable is lora.down.weight) != in_place
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype))
    for got, want in zip((lora.down.weight.grad, lora.up.weight.grad, x.grad), ref):
        tol = 1e-5 if amp is None else 0.05
        torch.testing.assert_close(got, 2 * want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    assert flat.grad.abs().sum() > 0 and lora.down.weight.grad.data_ptr() == flat.grad.data_ptr()
    assert lora.down.weight.grad.dtype == torch.float32 and lora_layers._ANCHOR.grad is None
    with torch.no_grad():   # an optimiser's update in place: the layer computes with it at once
        flat.mul_(-0.5).add_(0.01)
    torch.testing.assert_close(fwd(x), _reference(layer, lora, x), rtol=1e-5, atol=1e-5)
