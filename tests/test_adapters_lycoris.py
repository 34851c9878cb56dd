"""Our adapters against the lycoris-lora package itself.

Each case builds a real LyCORIS module around a torch layer, fills every factor with
random non-zero values, takes its state_dict exactly as LyCORIS saves it, and checks
that ``deltas(make_adapter(...), ...)`` reproduces the weight change LyCORIS applies.

Reference per algorithm:
* LoCon, IA3, Full, Norm: ``get_merged_weight(multiplier) - original`` (and, where the
  module has a rebuild forward, the delta its forward feeds to the layer op as well).
* LoHa, LoKr: the delta the module's forward feeds to the layer op (``_rebuild_forward``).
  In lycoris 4.1.3 their ``get_diff_weight``/``get_merged_weight``/``merge_to`` multiply by
  alpha/rank twice (``get_weight`` already applies ``self.scale``), unlike their own forward,
  A1111 and ComfyUI; the forward is what a trained file means.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lycoris")
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402
from lycoris.modules.norms import NormModule  # noqa: E402

from lib_lora.adapters import AdapterError, make_adapter  # noqa: E402
from lib_lora.adapters.full import Full  # noqa: E402
from lib_lora.adapters.ia3 import IA3  # noqa: E402
from lib_lora.adapters.lora import LoRA  # noqa: E402
from lib_lora.adapters.loha import LoHa  # noqa: E402
from lib_lora.adapters.lokr import LoKr  # noqa: E402
from lib_lora.adapters.norm import Norm  # noqa: E402
from loras import deltas  # noqa: E402

MULTIPLIERS = (1.0, 0.6)


# --------------------------------------------------------------------------- helpers


def make_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(64, 48)
    elif kind == "conv":
        layer = nn.Conv2d(32, 24, 3, padding=1)
    elif kind == "layernorm":
        layer = nn.LayerNorm(16)
    elif kind == "groupnorm":
        layer = nn.GroupNorm(4, 16)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial original weights (norm layers start at ones/zeros)
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def sample_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(2, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(1, layer.in_channels, 5, 5)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(2, *layer.normalized_shape)
    return torch.randn(1, layer.num_channels, 2, 2)


def randomise(module: nn.Module, seed: int, std: float = 0.3) -> None:
    """Every trainable factor random and non-zero (LyCORIS zero-inits one side)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":  # keep magnitudes plausible but different from ||W||
                p.mul_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def saved(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS writes for this module (its custom state_dict, keys without prefix)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def forward_delta(module, layer: nn.Module, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) delta the LyCORIS module's own forward applies on top of the layer."""
    seen = {}
    real = module.op

    def spy(x, *args, **kw):
        seen["w"] = kw["weight"] if "weight" in kw else args[0]
        seen["b"] = kw["bias"] if "bias" in kw else (args[1] if len(args) > 1 else None)
        return real(x, *args, **kw)

    module.op = spy
    module.multiplier = multiplier
    try:
        with torch.no_grad():
            module(sample_input(layer))
    finally:
        module.op = real
    return seen["w"].detach().clone(), None if seen["b"] is None else seen["b"].detach().clone()


def merged_delta(module, weight: torch.Tensor, bias: torch.Tensor | None, multiplier: float):
    with torch.no_grad():
        w, b = module.get_merged_weight(multiplier=multiplier, shape=weight.shape)
    return w - weight, None if b is None else b - bias


def assert_close(ours: torch.Tensor | None, ref: torch.Tensor) -> None:
    assert ours is not None
    assert ours.dtype == torch.float32
    ref = ref.detach().float()
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 1e-3, "reference delta is trivial; the test would prove nothing"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def originals(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(layer, "bias", None)
    return layer.weight.detach().clone(), None if bias is None else bias.detach().clone()


def check_against(module, layer, sd, cls, *, use_forward: bool, use_merged: bool) -> None:
    weight, bias = originals(layer)
    adapter = make_adapter("lora_unet_test", sd)
    assert type(adapter) is cls
    assert not set(sd) - adapter.known_suffixes()
    for m in MULTIPLIERS:
        dw, db = deltas(adapter, weight, bias, m)
        if use_forward:
            assert_close(dw, forward_delta(module, layer, m)[0])
        if use_merged:
            assert_close(dw, merged_delta(module, weight, bias, m)[0])
        assert db is None


# --------------------------------------------------------------------------- LoRA / LoCon

LOCON_CASES = {
    "linear": ("linear", {}),
    "conv3x3": ("conv", {}),
    "conv_tucker_mid": ("conv", {"use_tucker": True}),
    "linear_dora_out": ("linear", {"weight_decompose": True, "wd_on_out": True}),
    "linear_dora_in": ("linear", {"weight_decompose": True, "wd_on_out": False}),
    "conv_dora_out": ("conv", {"weight_decompose": True, "wd_on_out": True}),
    "conv_tucker_dora_in": ("conv", {"use_tucker": True, "weight_decompose": True, "wd_on_out": False}),
}


@pytest.mark.parametrize("case", LOCON_CASES)
def test_locon_matches_lycoris(case: str) -> None:
    kind, kw = LOCON_CASES[case]
    layer = make_layer(kind)
    module = LoConModule("lora_unet_test", layer, 1.0, lora_dim=4, alpha=3, **kw)
    randomise(module, seed=1)
    sd = saved(module)
    assert ("lora_mid.weight" in sd) == kw.get("use_tucker", False)
    assert ("dora_scale" in sd) == kw.get("weight_decompose", False)
    check_against(module, layer, sd, LoRA, use_forward=True, use_merged=True)


# --------------------------------------------------------------------------- LoHa

LOHA_CASES = {
    "linear": ("linear", {}),
    "conv3x3": ("conv", {}),
    "conv_tucker": ("conv", {"use_tucker": True}),
    "linear_dora_out": ("linear", {"weight_decompose": True, "wd_on_out": True}),
    "linear_dora_in": ("linear", {"weight_decompose": True, "wd_on_out": False}),
    "conv_tucker_dora_out": ("conv", {"use_tucker": True, "weight_decompose": True, "wd_on_out": True}),
    "conv_dora_in": ("conv", {"weight_decompose": True, "wd_on_out": False}),
}


@pytest.mark.parametrize("case", LOHA_CASES)
def test_loha_matches_lycoris(case: str) -> None:
    kind, kw = LOHA_CASES[case]
    layer = make_layer(kind)
    module = LohaModule("lora_unet_test", layer, 1.0, lora_dim=4, alpha=3, **kw)
    randomise(module, seed=2)
    sd = saved(module)
    assert ("hada_t1" in sd) == kw.get("use_tucker", False)
    adapter = make_adapter("x", sd)
    assert adapter.rank() == 4
    check_against(module, layer, sd, LoHa, use_forward=True, use_merged=False)


# --------------------------------------------------------------------------- LoKr

# (layer factory, module kwargs, tensor roles LyCORIS must have written)
LOKR_CASES = {
    "full_w1_w2": (lambda: nn.Linear(16, 12), {"lora_dim": 8}, {"lokr_w1", "lokr_w2"}),
    "factorised_w2": (lambda: nn.Linear(64, 48), {"lora_dim": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "factorised_w1": (lambda: nn.Linear(4, 64), {"lora_dim": 4, "decompose_both": True, "factor": 2,
                                         "unbalanced_factorization": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
    "decompose_both": (lambda: nn.Linear(64, 48), {"lora_dim": 2, "decompose_both": True},
                       {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    "conv_factorised_w2": (lambda: nn.Conv2d(32, 24, 3, padding=1), {"lora_dim": 2},
                           {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv_tucker_w2": (lambda: nn.Conv2d(32, 24, 3, padding=1), {"lora_dim": 2, "use_tucker": True},
                       {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "conv_full_w2": (lambda: nn.Conv2d(32, 24, 3, padding=1), {"lora_dim": 8}, {"lokr_w1", "lokr_w2"}),
    "linear_dora_out": (lambda: nn.Linear(64, 48), {"lora_dim": 2, "weight_decompose": True, "wd_on_out": True},
                        {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "dora_scale"}),
    "linear_both_dora_in": (lambda: nn.Linear(64, 48), {"lora_dim": 2, "decompose_both": True, "weight_decompose": True,
                                                "wd_on_out": False},
                            {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "dora_scale"}),
    "conv_tucker_dora_in": (lambda: nn.Conv2d(32, 24, 3, padding=1), {"lora_dim": 2, "use_tucker": True,
                                                              "weight_decompose": True, "wd_on_out": False},
                            {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale"}),
    "conv_dora_out": (lambda: nn.Conv2d(32, 24, 3, padding=1),
                      {"lora_dim": 2, "weight_decompose": True, "wd_on_out": True},
                      {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "dora_scale"}),
}


def _lokr(case: str, alpha: float = 3.0):
    make, kw, roles = LOKR_CASES[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    module = LokrModule("lora_unet_test", layer, 1.0, alpha=alpha, **kw)
    randomise(module, seed=3)
    sd = saved(module)
    assert set(sd) == roles | {"alpha"}
    return layer, module, sd


@pytest.mark.parametrize("case", LOKR_CASES)
def test_lokr_matches_lycoris(case: str) -> None:
    layer, module, sd = _lokr(case)
    factorised = any(k.endswith("_a") for k in sd)
    assert module.scale == (pytest.approx(3.0 / module.lora_dim) if factorised else 1.0)
    assert make_adapter("x", sd).rank() == (module.lora_dim if factorised else None)
    check_against(module, layer, sd, LoKr, use_forward=True, use_merged=False)


def test_lokr_full_sides_ignore_alpha() -> None:
    """With both sides full LyCORIS uses scale 1 whatever alpha a file carries; read it with its own loader."""
    layer, _, sd = _lokr("full_w1_w2")
    sd["alpha"] = torch.tensor(5.0)
    weights = LokrModule.extract_state_dict({f"m.{k}": v for k, v in sd.items()}, "m")
    with torch.no_grad():
        loaded = LokrModule.make_module_from_state_dict("m", layer, *weights)
    weight, bias = originals(layer)
    adapter = make_adapter("x", sd)
    for m in MULTIPLIERS:
        assert_close(deltas(adapter, weight, bias, m)[0], forward_delta(loaded, layer, m)[0])


def test_lokr_alpha_scales_factorised() -> None:
    """The same factors saved with another alpha scale the delta by alpha/rank (guards against a fixed scale)."""
    layer, module, sd = _lokr("factorised_w2", alpha=1.0)
    weight, bias = originals(layer)
    ref = forward_delta(module, layer, 1.0)[0]
    sd["alpha"] = torch.tensor(4.0)  # rank 2: scale 0.5 -> 2.0
    assert_close(deltas(make_adapter("x", sd), weight, bias, 1.0)[0], ref * 4.0)


# --------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("with_flag", [True, False])
def test_ia3_matches_lycoris(kind: str, on_input: bool, with_flag: bool) -> None:
    layer = make_layer(kind)
    module = IA3Module("lora_unet_test", layer, 1.0, train_on_input=on_input)
    randomise(module, seed=4)
    sd = saved(module)
    assert set(sd) == {"weight", "on_input"} and int(sd["on_input"]) == int(on_input)
    if not with_flag:  # orientation then comes from the shape (layers here are not square)
        del sd["on_input"]
    check_against(module, layer, sd, IA3, use_forward=True, use_merged=True)


# --------------------------------------------------------------------------- Full


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_full_matches_lycoris(kind: str, has_bias: bool) -> None:
    layer = make_layer(kind)
    if not has_bias:
        layer.bias = None
    weight, bias = originals(layer)
    module = FullModule("lora_unet_test", layer, 1.0)
    module.apply_to()  # as LycorisNetwork does before training; saving expects this state
    torch.manual_seed(5)
    with torch.no_grad():  # "training": move the weight (and bias) away from the original
        module.weight.add_(torch.randn_like(module.weight) * 0.3)
        if has_bias:
            module.bias.add_(torch.randn_like(module.bias) * 0.3)
    sd = saved(module)
    assert set(sd) == ({"diff", "diff_b"} if has_bias else {"diff"})
    adapter = make_adapter("x", sd)
    assert type(adapter) is Full
    for m in MULTIPLIERS:
        dw, db = deltas(adapter, weight, bias, m)
        ref_w, ref_b = merged_delta(module, weight, bias, m)
        assert_close(dw, ref_w)
        if has_bias:
            assert_close(db, ref_b)
        else:
            assert db is None and ref_b is None


# --------------------------------------------------------------------------- Norm


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_norm_matches_lycoris(kind: str) -> None:
    layer = make_layer(kind)
    weight, bias = originals(layer)
    module = NormModule("lora_unet_test", layer, 1.0)
    randomise(module, seed=6)
    sd = saved(module)
    assert set(sd) == {"w_norm", "b_norm"}
    adapter = make_adapter("x", sd)
    assert type(adapter) is Norm
    for m in MULTIPLIERS:
        dw, db = deltas(adapter, weight, bias, m)
        ref_w, ref_b = merged_delta(module, weight, bias, m)
        assert_close(dw, ref_w)
        assert_close(db, ref_b)
        fw, fb = forward_delta(module, layer, m)
        assert_close(dw, fw)
        assert_close(db, fb)


# --------------------------------------------------------------------------- claims and errors


def test_registry_claims() -> None:
    v = torch.ones(4)
    m = torch.ones(4, 4)
    cases = [
        ({"lora_down.weight": m, "lora_up.weight": m, "alpha": v[0]}, LoRA),
        ({"hada_w1_a": m, "hada_w1_b": m, "hada_w2_a": m, "hada_w2_b": m}, LoHa),
        ({"lokr_w1": m, "lokr_w2": m}, LoKr),
        ({"weight": v, "on_input": torch.tensor(0)}, IA3),
        ({"weight": v}, IA3),
        ({"diff": m, "diff_b": v}, Full),
        ({"diff": m, "weight": v}, Full),  # a stray "weight" must not turn a Full group into IA3
        ({"w_norm": v, "b_norm": v}, Norm),
    ]
    for tensors, cls in cases:
        assert type(make_adapter("x", tensors)) is cls, sorted(tensors)


@pytest.mark.parametrize("roles", [
    {"foo"},
    {"alpha"},
    {"weight", "bias"},  # a plain layer state, not IA3
    {"weight", "dora_scale"},
    {"lora_down.weight"},
    {"hada_w1_a", "hada_w1_b", "hada_w2_a"},
    {"b_norm"},
    {"diff_b"},
])
def test_unknown_tensor_sets_rejected(roles: set[str]) -> None:
    with pytest.raises(AdapterError):
        make_adapter("x", {r: torch.ones(4) for r in roles})


def _raises(tensors: dict[str, torch.Tensor], weight: torch.Tensor | None = None, bias=None) -> None:
    with pytest.raises(AdapterError):
        adapter = make_adapter("x", tensors)
        if weight is not None:
            deltas(adapter, weight, bias, 1.0)


def test_bad_shapes_raise() -> None:
    r = torch.randn
    lin, conv = r(12, 16), r(12, 16, 3, 3)
    # LoHa: factors that do not chain, halves that differ, a lone Tucker core, a delta that fits no layer
    _raises({"hada_w1_a": r(12, 4), "hada_w1_b": r(3, 16), "hada_w2_a": r(12, 4), "hada_w2_b": r(4, 16)})
    _raises({"hada_w1_a": r(12, 4), "hada_w1_b": r(4, 16), "hada_w2_a": r(10, 4), "hada_w2_b": r(4, 16)})
    _raises({"hada_w1_a": r(4, 12), "hada_w1_b": r(4, 16), "hada_w2_a": r(4, 12), "hada_w2_b": r(4, 16),
             "hada_t1": r(4, 4, 3, 3)})
    _raises({"hada_w1_a": r(4, 12), "hada_w1_b": r(4, 16), "hada_w2_a": r(4, 12), "hada_w2_b": r(4, 16),
             "hada_t1": r(4, 3, 3, 3), "hada_t2": r(4, 4, 3, 3)})
    _raises({"hada_w1_a": r(12, 4), "hada_w1_b": r(4, 16), "hada_w2_a": r(12, 4), "hada_w2_b": r(4, 16)}, r(16, 12))
    # LoKr: a missing side, pairs that do not chain, a Tucker core that does not fit, a kron that fits no layer
    _raises({"lokr_w1": r(3, 4)})
    _raises({"lokr_w1_a": r(3, 2), "lokr_w2": r(4, 4)})
    _raises({"lokr_w1_a": r(3, 2), "lokr_w1_b": r(3, 4), "lokr_w2": r(4, 4)})
    _raises({"lokr_w1": r(3, 4), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(3, 4)})
    _raises({"lokr_w1": r(3, 4), "lokr_w2_a": r(2, 4), "lokr_w2_b": r(2, 4), "lokr_t2": r(3, 2, 3, 3)})
    _raises({"lokr_w1": r(3, 4), "lokr_w2": r(4, 4), "lokr_t2": r(2, 2, 3, 3)})
    _raises({"lokr_w1": r(3, 4), "lokr_w2": r(4, 4)}, r(16, 12))
    _raises({"lokr_w1": r(3, 4), "lokr_w2": r(4, 4, 3, 3)}, lin)
    # IA3: not a vector, or a vector for neither side of the layer
    _raises({"weight": r(12, 16)})
    _raises({"weight": r(5)}, lin)
    _raises({"weight": r(12), "on_input": torch.tensor(1)}, lin)
    _raises({"weight": r(1, 16, 1, 1), "on_input": torch.tensor(0)}, conv)
    # Full: wrong weight shape; a bias delta for a layer without bias
    _raises({"diff": r(12, 15)}, lin)
    _raises({"diff": r(12, 16), "diff_b": r(12)}, lin, None)
    _raises({"diff": r(12, 16), "diff_b": r(11)}, lin, r(12))
    # Norm: not 1-D, or not the layer's width
    _raises({"w_norm": r(4, 4)})
    _raises({"w_norm": r(8), "b_norm": r(8)}, r(16), r(16))
    # DoRA magnitude that fits neither the layer's outputs nor its inputs
    _raises({"hada_w1_a": r(12, 4), "hada_w1_b": r(4, 16), "hada_w2_a": r(12, 4), "hada_w2_b": r(4, 16),
             "dora_scale": r(1, 7)}, lin)


def test_base_dora_matches_lycoris_weight_decompose() -> None:
    """base.dora_delta against lycoris.functional.general.weight_decompose for both orientations."""
    from lycoris.functional.general import weight_decompose

    from lib_lora.adapters.base import dora_delta

    torch.manual_seed(7)
    for shape in ((12, 16), (12, 16, 3, 3), (16, 16)):
        w, d = torch.randn(shape), torch.randn(shape) * 0.3
        for on_out in (True, False):
            flat = w.transpose(0, 1) if not on_out else w
            norm = flat.reshape(flat.shape[0], -1).norm(dim=1) * (1 + 0.3 * torch.rand(flat.shape[0]))
            mag = norm.reshape(-1, *[1] * (w.dim() - 1))
            if not on_out:
                mag = mag.transpose(0, 1)
            for m in MULTIPLIERS:
                ref = weight_decompose(w + d, mag, m, on_out) - w
                assert_close(dora_delta(w, d, mag, m, "x"), ref)
