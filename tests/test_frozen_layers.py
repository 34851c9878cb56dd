"""frozen_layers: same gradients as autograd, fewer saved activations, nothing left behind."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lib_lora.training.frozen_layers as frozen_layers_module
from lib_lora.modelmap import ModelMap
from lib_lora.training.frozen_layers import _use_gemm, frozen_layers
from lib_lora.training.network import NetworkConfig, TrainingNetwork
from tiny_models import OPENCLIP_EMBED_DIM, build_sd1, build_sdxl, sdxl_y


def _saved_activation_bytes(fn, params, lean_roots: tuple[nn.Module, ...] = ()) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward while ``fn`` runs.

    With ``lean_roots``, ``fn`` runs inside ``frozen_layers(*lean_roots)``, whose own saved-tensor
    hooks decide what is kept (a rebuilt activation is kept as a recipe, not a tensor): they
    are counted there.
    """
    pids = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def count(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in pids:
                seen[st.data_ptr()] = st.nbytes()
        return t

    if not lean_roots:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            fn()
        return sum(seen.values())
    pack = frozen_layers_module._Rebuild.pack
    frozen_layers_module._Rebuild.pack = lambda self, t: count(pack(self, t))
    try:
        with frozen_layers(*lean_roots):
            fn()
    finally:
        frozen_layers_module._Rebuild.pack = pack
    return sum(seen.values())


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad,batch", [
    (16, 256, 4, 3, 1, 1, 2),     # weight-bound: the GEMM path
    (16, 256, 8, 3, 2, 1, 1),     # strided, GEMM
    (8, 16, 8, 3, 1, 1, 2),       # activation-bound: aten's conv + input-only backward
    (8, 8, 6, 1, 1, 0, 3),        # 1x1
])
def test_conv_matches_autograd(cin, cout, hw, k, stride, pad, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad).double().requires_grad_(False)
    x = torch.randn(batch, cin, hw, hw, dtype=torch.double, requires_grad=True)
    ref = conv(x)
    g = torch.randn_like(ref)
    ref_gx, = torch.autograd.grad(ref, x, g)
    with frozen_layers(conv) as n:
        y = conv(x)
        assert n == 1 and type(y.grad_fn).__name__ == "_FrozenConv2dBackward"
        gx, = torch.autograd.grad(y, x, g)
    # only the weight is kept: no activation at all
    assert _saved_activation_bytes(lambda: conv(x), [conv.weight, conv.bias], (conv,)) == 0
    assert _saved_activation_bytes(lambda: conv(x), [conv.weight, conv.bias]) > 0  # autograd keeps the input
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    assert "forward" not in vars(conv)


@pytest.mark.parametrize("shape,bias", [((2, 8, 96), True),      # 16 rows: weight as the left operand
                                        ((1, 64, 96), False),
                                        ((3, 40, 96), True)])    # 120 rows: F.linear
def test_linear_matches_autograd(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).double().requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    ref = lin(x)
    g = torch.randn_like(ref)
    ref_gx, = torch.autograd.grad(ref, x, g)
    with frozen_layers(lin):
        y = lin(x)
        assert type(y.grad_fn).__name__ == "_FrozenLinearBackward" and y.is_contiguous()
        gx, = torch.autograd.grad(y, x, g)
    assert gx.shape == x.shape and gx.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    assert _saved_activation_bytes(lambda: lin(x), list(lin.parameters()), (lin,)) == 0


def test_gemm_choice_depends_on_shapes_only():
    w = torch.empty(1280, 1280, 3, 3)
    assert _use_gemm(torch.empty(1, 1280, 8, 8), w, (8, 8), 1)          # SD1.5's 8x8 level at batch 1
    assert not _use_gemm(torch.empty(1, 320, 32, 32), torch.empty(320, 320, 3, 3), (32, 32), 1)
    assert not _use_gemm(torch.empty(1, 1280, 8, 8), torch.empty(1280, 1280, 1, 1), (8, 8), 1)  # 1x1: aten


def test_trainable_and_no_grad_layers_keep_their_own_forward():
    conv = nn.Conv2d(4, 64, 3, padding=1)                                 # weight requires grad
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    with frozen_layers(conv):
        assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"
        conv.requires_grad_(False)
        with torch.no_grad():
            assert conv(x).grad_fn is None


def _lora_grads(tiny, lean: bool, batch: int = 2, amp: torch.dtype | bool = False, device: str = "cpu"):
    """Loss, LoRA/LoCon gradients and saved bytes of one UNet forward+backward; ``amp``: autocast
    dtype (True: bf16), ``device``: where ``tiny`` already is."""
    net = TrainingNetwork(ModelMap.build(tiny.family, tiny.unet, tiny.text_encoders),
                          NetworkConfig(rank=4, alpha=4, conv_rank=4, conv_alpha=4, train_text_encoder=False))
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():          # non-zero up weights so every path carries gradient
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    net.to(device)
    tiny.unet.requires_grad_(False)
    for _, te in tiny.text_encoders:
        te.requires_grad_(False)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device)
    ctx_dim = tiny.config["context_dim"]
    ctx = torch.randn(batch, 77, ctx_dim, generator=g).to(device)
    t = torch.tensor([10, 700][:batch], device=device)
    kw = {}
    if tiny.family == "sdxl":
        kw["y"] = sdxl_y(torch.randn(batch, OPENCLIP_EMBED_DIM, generator=g),
                         torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32)).to(device)
    amp_dtype = torch.bfloat16 if amp is True else amp

    def forward():
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.bfloat16, enabled=bool(amp)):
            return tiny.unet(x, t, context=ctx, **kw)

    net.attach()
    try:
        with frozen_layers(tiny.unet) if lean else torch.enable_grad():
            loss = forward().float().square().mean()
            grads = torch.autograd.grad(loss, list(net.parameters()))
        params = list(tiny.unet.parameters()) + list(net.parameters())
        saved = _saved_activation_bytes(forward, params, (tiny.unet,) if lean else ())
    finally:
        net.detach()
    return loss.detach(), grads, saved


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
def test_lora_gradients_through_a_real_unet_match_autograd(build):
    tiny = build()
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    loss, ref, saved_plain = _lora_grads(tiny, lean=False)
    loss2, got, saved_lean = _lora_grads(tiny, lean=True)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the frozen convs' inputs and the normalised / gelu tensors are no longer kept (counted by
    # autograd's own saved-tensor hooks; recomputed pieces keep their input inside checkpoint)
    assert saved_lean < 0.9 * saved_plain, (saved_lean, saved_plain)
    assert not [m for m in tiny.unet.modules() if "forward" in vars(m)]
    after = tiny.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_autocast_forward_then_backward():
    """AMP: the forward runs in bf16 under autocast, backward outside it against fp32 weights."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(8, 256, 3, padding=1), nn.SiLU(), nn.Conv2d(256, 8, 3, padding=1),
                           nn.Flatten(2), nn.LayerNorm(16), nn.Linear(16, 16)).requires_grad_(False)
    with torch.no_grad():
        layers[4].weight.uniform_(0.5, 1.5)
        layers[4].bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    grads = []
    for lean in (False, True):
        with frozen_layers(layers) if lean else torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layers(x)
        assert y.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(y.float().square().sum(), x)[0])
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.05 * grads[0].abs().max().item())


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
def test_rebuilt_activations_give_the_same_gradients_and_are_not_kept(build, monkeypatch):
    """GEGLU outputs (input of the FeedForward LoRA) and GroupNorm->SiLU outputs (input of a LoCon)
    are rebuilt in backward: bit-identical gradients, and their bytes are no longer kept."""
    tiny = build()
    monkeypatch.setattr(frozen_layers_module._Rebuild, "register", lambda *a: None)
    loss, ref, saved_kept = _lora_grads(tiny, lean=True)
    monkeypatch.undo()
    loss2, got, saved_rebuilt = _lora_grads(tiny, lean=True)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # exactly the GEGLU outputs and the SiLU outputs of the resnet heads (each before a LoCon),
    # where gradient flows (the first resnet's input needs none); the final head feeds conv_out,
    # which no LoRA adapts, so nothing kept its output in the first place
    rebuilt = []
    rebuildable = [m for m in tiny.unet.modules() if type(m).__name__ == "GEGLU"] + \
        [m[1] for m in tiny.unet.modules() if frozen_layers_module._norm_act_head(m) and m is not tiny.unet.out]
    hooks = [m.register_forward_hook(lambda m, a, out: rebuilt.append(out.nbytes * a[0].requires_grad))
             for m in rebuildable]
    _lora_grads(tiny, lean=False)   # two forwards
    for h in hooks:
        h.remove()
    assert saved_kept - saved_rebuilt == sum(rebuilt) // 2, (saved_kept, saved_rebuilt, sum(rebuilt) // 2)


def test_an_output_changed_in_place_is_kept_not_rebuilt():
    rebuild = frozen_layers_module._Rebuild()
    src = torch.randn(4, 6, requires_grad=True) * 1.0
    out = frozen_layers_module._gate(src)
    rebuild.register(out, frozen_layers_module._gate, src)
    packed = rebuild.pack(out.view(-1))
    assert not isinstance(packed, torch.Tensor)
    torch.testing.assert_close(rebuild.unpack(packed), out.view(-1), rtol=0, atol=0)
    with torch.no_grad():
        out.add_(1)
    assert rebuild.pack(out) is out                       # stale recipe: keep the tensor itself
    other = torch.randn(3)
    assert rebuild.pack(other) is other
    del out
    assert not rebuild._by_storage                        # the registration died with its tensor


def test_layer_norm_keeps_its_output_and_matches_autograd():
    torch.manual_seed(0)
    norm = nn.LayerNorm(32).double().requires_grad_(False)
    with torch.no_grad():   # trained-looking affine parameters, some weights small and negative
        norm.weight.copy_(torch.randn(32, dtype=torch.double).sign() * torch.rand(32, dtype=torch.double) * 2 + 0.01)
        norm.bias.copy_(torch.randn(32, dtype=torch.double))
    x = (torch.randn(3, 7, 32, dtype=torch.double) * 4 + 1).requires_grad_(True)
    g = torch.randn(3, 7, 32, dtype=torch.double)
    ref = norm(x)
    ref_gx, = torch.autograd.grad(ref, x, g)
    with frozen_layers(norm) as n:
        y = norm(x)
        gx, = torch.autograd.grad(y, x, g)
    assert n == 1
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-12)
    # what is kept is the output (what a LoRA after the norm keeps anyway) and one rstd per row
    saved = _saved_activation_bytes(lambda: norm(x), [norm.weight, norm.bias], (norm,))
    assert saved == y.nbytes + 3 * 7 * 8

    with torch.no_grad():
        norm.weight[3] = 0          # the normalised input cannot be recovered: aten's own LayerNorm
    with frozen_layers(norm) as n:
        assert n == 0 and type(norm(x).grad_fn).__name__ == "NativeLayerNormBackward0"


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
def test_lean_bf16_gradients_are_as_close_to_fp32_as_autograds(build):
    """AMP on a real UNet (CPU bf16 autocast standing in for a GPU's): LoRA, LoCon, rebuilt
    activations, the LayerNorm from its output and the weight-left linears all in half precision."""
    tiny = build()
    _, ref, _ = _lora_grads(tiny, lean=False)
    _, plain, _ = _lora_grads(tiny, lean=False, amp=True)
    _, lean, _ = _lora_grads(tiny, lean=True, amp=True)

    def error(grads) -> float:
        a, b = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref])
        return ((a - b).norm() / b.norm()).item()

    assert 0 < error(lean) < 1.25 * error(plain) + 1e-3, (error(lean), error(plain))


def test_autocast_state_with_the_torch_2_1_functions(monkeypatch):
    import lib_lora.autocast as amp
    monkeypatch.setattr(amp, "BY_DEVICE_TYPE", False)   # WebUI 1.10's torch 2.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert amp.autocast_state("cpu") == ("cpu", torch.bfloat16, True)
        assert amp.autocasting("cpu") and not amp.autocasting("cuda") and not amp.autocasting("meta")
    assert amp.autocast_state("cpu")[2] is False and not amp.autocasting("cpu")


def test_linears_are_wrapped_where_they_change_something(monkeypatch):
    """This torch's linear keeps no input when its weight is frozen, so off CPU (where the
    weight-left product is the only other reason) frozen linears keep their own forward."""
    lin = nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(5, 64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        lin(x)
    keeps_input = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    assert frozen_layers_module._autograd_keeps_linear_input() is keeps_input is False
    with frozen_layers(lin) as n:
        assert n == 1                                   # CPU: the weight-left products
    off_cpu = nn.Linear(64, 32, device="meta").requires_grad_(False)
    with frozen_layers(off_cpu) as n:
        assert n == 0
    monkeypatch.setattr(frozen_layers_module, "_autograd_keeps_linear_input", lambda: True)  # an older torch
    with frozen_layers(off_cpu) as n:
        assert n == 1
