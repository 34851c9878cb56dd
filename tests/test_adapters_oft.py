"""OFT, BOFT and GLoRA against their producers.

LyCORIS diag-OFT, BOFT and GLoRA: the lycoris-lora package's own modules (their forward's
weight delta and their merged weight), on a Linear and a Conv2d with random non-zero factors,
saved with LyCORIS's key spelling and read back through ``parse_state_dict``.
sd-scripts' networks.oft (not on PyPI): its published formula computed here with plain torch
(Cayley transform of each skew-symmetric block, the norm clamp from alpha, the block-diagonal
rotation applied to the output rows), and its ``oft_unet_`` keys through the whole patcher.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule, _glora_weight  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402

from lib_lora.adapters import AdapterError, make_adapter  # noqa: E402
from lib_lora.adapters.boft import BOFT  # noqa: E402
from lib_lora.adapters.diag_oft import DiagOFT  # noqa: E402
from lib_lora.adapters.glora import GLoRA  # noqa: E402
from lib_lora.modelmap import ModelMap  # noqa: E402
from lib_lora.network import parse_state_dict  # noqa: E402
from lib_lora.patcher import Patcher  # noqa: E402
from loras import activation, deltas, same, snapshot  # noqa: E402
from test_adapters_lycoris import (MULTIPLIERS, assert_close, forward_delta, make_layer, merged_delta,  # noqa: E402
                                   originals, randomise, saved)

KEY = "lora_unet_test"


def _randomise_oft(module: nn.Module, seed: int, std: float = 0.3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        module.oft_blocks.normal_(0, std)
        if getattr(module, "rescaled", False):
            module.rescale.copy_(1 + 0.3 * torch.randn_like(module.rescale))


def _parsed(sd: dict[str, torch.Tensor]):
    """One module's tensors under LyCORIS's kohya-style key, read like a file."""
    net = parse_state_dict("x", {f"{KEY}.{k}": v for k, v in sd.items()}, {})
    assert not net.unknown_keys and not net.errors
    return net.adapters[KEY]


def _check(module, layer, sd, cls) -> None:
    weight, bias = originals(layer)
    adapter = _parsed(sd)
    assert type(adapter) is cls and adapter.needs_weight
    for m in MULTIPLIERS:
        dw, db = deltas(adapter, weight, bias, m)
        assert db is None
        assert_close(dw, forward_delta(module, layer, m)[0])
        assert_close(dw, merged_delta(module, weight, bias, m)[0])


# --------------------------------------------------------------------------- LyCORIS diag-OFT

# constraint: 0 = unconstrained; 0.002 * out channels is below the random blocks' norm, so it clamps
OFT_CASES = {
    "linear": ("linear", 0.0, False),
    "linear_constrained": ("linear", 0.002, False),
    "linear_rescaled": ("linear", 0.0, True),
    "conv": ("conv", 0.0, False),
    "conv_constrained_rescaled": ("conv", 0.002, True),
}


@pytest.mark.parametrize("case", OFT_CASES)
def test_diag_oft_matches_lycoris(case: str) -> None:
    kind, constraint, rescaled = OFT_CASES[case]
    layer = make_layer(kind)
    module = DiagOFTModule(KEY, layer, 1.0, lora_dim=4, constraint=constraint, rescaled=rescaled)
    _randomise_oft(module, seed=11)
    sd = saved(module)
    assert set(sd) == {"oft_blocks", "alpha"} | ({"rescale"} if rescaled else set())
    assert sd["oft_blocks"].dim() == 3
    if constraint:  # the clamp really acts
        q = sd["oft_blocks"] - sd["oft_blocks"].transpose(1, 2)
        assert q.norm() > constraint * layer.weight.shape[0]
    _check(module, layer, sd, DiagOFT)


def test_lycoris_2_0_oft_diag_is_the_rotation_itself() -> None:
    """LyCORIS 2.0 saved ``oft_diag`` = R (its get_r()); applying it must equal the module's forward."""
    layer = make_layer("linear")
    module = DiagOFTModule(KEY, layer, 1.0, lora_dim=4, constraint=0.0)
    _randomise_oft(module, seed=12)
    with torch.no_grad():
        sd = {"oft_diag": module.get_r().detach().clone()}
    weight, bias = originals(layer)
    adapter = _parsed(sd)
    assert type(adapter) is DiagOFT
    for m in MULTIPLIERS:
        assert_close(deltas(adapter, weight, bias, m)[0], forward_delta(module, layer, m)[0])
    # a stored R with a folded-in rescale is applied as it is: block by block, rows mixed as R^T W
    r = sd["oft_diag"] * (1 + 0.2 * torch.randn(sd["oft_diag"].shape[0], sd["oft_diag"].shape[1], 1))
    n, b, _ = r.shape
    ref = torch.cat([(0.6 * (r[k] - torch.eye(b))).T @ weight[k * b:(k + 1) * b] for k in range(n)])
    assert_close(deltas(make_adapter("x", {"oft_diag": r}), weight, bias, 0.6)[0], ref)


# --------------------------------------------------------------------------- LyCORIS BOFT

BOFT_CASES = {
    "linear": (lambda: nn.Linear(16, 32), 4, 0.0, False),
    "linear_constrained_rescaled": (lambda: nn.Linear(16, 32), 4, 0.002, True),
    "conv": (lambda: nn.Conv2d(8, 64, 3, padding=1), 8, 0.0, False),
    "conv_rescaled": (lambda: nn.Conv2d(8, 32, 3, padding=1), 4, 0.0, True),
}


@pytest.mark.parametrize("case", BOFT_CASES)
def test_boft_matches_lycoris(case: str) -> None:
    make, dim, constraint, rescaled = BOFT_CASES[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    module = ButterflyOFTModule(KEY, layer, 1.0, lora_dim=dim, constraint=constraint, rescaled=rescaled)
    _randomise_oft(module, seed=13, std=0.2)
    sd = saved(module)
    assert sd["oft_blocks"].dim() == 4 and sd["oft_blocks"].shape[0] > 1  # several butterfly stages
    _check(module, layer, sd, BOFT)


# --------------------------------------------------------------------------- sd-scripts OFT


def sd_scripts_oft_delta(weight: torch.Tensor, blocks: torch.Tensor, alpha: float, multiplier: float) -> torch.Tensor:
    """sd-scripts' published definition, written out independently: Q_k = B_k - B_k^T; the norm of all Q
    clamped to alpha * out as Q * (min(|Q|, c) + 1e-8) / (|Q| + 1e-8); R_k = (I + Q_k)(I - Q_k)^-1;
    weighted R_k(m) = m (R_k - I) + I; merged rows of block k are R_k(m)^T times W's rows of block k."""
    w = weight.double()
    q = (blocks - blocks.transpose(1, 2)).double()
    norm = torch.linalg.norm(q.flatten())
    c = alpha * w.shape[0]
    q = q * ((min(norm.item(), c) + 1e-8) / (norm.item() + 1e-8))
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    rs = [(eye + qk) @ torch.linalg.inv(eye - qk) for qk in q]
    full = torch.block_diag(*[multiplier * (r - eye) + eye for r in rs])
    return (full.T @ w.reshape(w.shape[0], -1)).reshape(w.shape).float() - weight


@pytest.mark.parametrize("alpha", [1e-3, 0.5])
@pytest.mark.parametrize("shape", [(48, 32), (24, 16, 3, 3)])
def test_sd_scripts_oft_formula(alpha: float, shape) -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=g)
    blocks = torch.randn(4, shape[0] // 4, shape[0] // 4, generator=g) * 0.05
    net = parse_state_dict("k", {"oft_unet_x.oft_blocks": blocks, "oft_unet_x.alpha": torch.tensor(alpha)}, {})
    adapter = net.adapters["lora_unet_x"]
    assert type(adapter) is DiagOFT and not net.unknown_keys
    for m in MULTIPLIERS + (-0.5,):
        assert_close(deltas(adapter, weight, None, m)[0], sd_scripts_oft_delta(weight, blocks, alpha, m))


def test_sd_scripts_oft_alpha_zero_is_a_no_op_unlike_lycoris() -> None:
    """sd-scripts clamps the norm to alpha * out even at 0; LyCORIS reads alpha 0 as 'unconstrained'."""
    g = torch.Generator().manual_seed(4)
    weight, blocks = torch.randn(16, 8, generator=g), torch.randn(2, 8, 8, generator=g) * 0.1
    kohya = parse_state_dict("k", {"oft_unet_x.oft_blocks": blocks, "oft_unet_x.alpha": torch.tensor(0.0)}, {})
    lyco = parse_state_dict("l", {"lora_unet_x.oft_blocks": blocks, "lora_unet_x.alpha": torch.tensor(0.0)}, {})
    assert deltas(kohya.adapters["lora_unet_x"], weight, None, 1.0)[0].abs().max() < 1e-6
    assert deltas(lyco.adapters["lora_unet_x"], weight, None, 1.0)[0].abs().max() > 1e-2


# sd-scripts' default targets: the linears of CrossAttention blocks (attn1/attn2 to_q/k/v/out), diffusers names
_ATTN = "down_blocks_0_attentions_0_transformer_blocks_0"


def test_sd_scripts_oft_file_through_the_patcher() -> None:
    from tiny_models import build_sd1

    tiny = build_sd1(seed=8)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    g = torch.Generator().manual_seed(9)
    sd, originals_by_key = {}, {}
    for proj in ("attn1_to_q", "attn1_to_k", "attn2_to_v", "attn2_to_out_0"):
        key = f"lora_unet_{_ATTN}_{proj}"
        w = mm.get(key).weight()
        n = 4
        sd[f"oft_unet_{_ATTN}_{proj}.oft_blocks"] = torch.randn(n, w.shape[0] // n, w.shape[0] // n, generator=g) * 0.05
        sd[f"oft_unet_{_ATTN}_{proj}.alpha"] = torch.tensor(1e-2)
        originals_by_key[key] = w.detach().clone()
    net = parse_state_dict("sd-scripts-oft", sd, {})
    assert net.algorithms() == {"oft": 4} and net.count("unet") == 4
    before = snapshot(tiny.unet)
    p = Patcher(mm)
    rep = p.apply([activation(net, 0.7, 0.7)])
    assert not rep.messages and rep.applied == {"sd-scripts-oft": 4}
    for key, w0 in originals_by_key.items():
        short = key[len("lora_unet_"):]
        ref = sd_scripts_oft_delta(w0, sd[f"oft_unet_{short}.oft_blocks"], 1e-2, 0.7)
        assert_close(mm.get(key).weight() - w0, ref)
    p.restore()
    assert same(before, snapshot(tiny.unet))


# --------------------------------------------------------------------------- GLoRA


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_glora_matches_lycoris(kind: str) -> None:
    layer = make_layer(kind)
    module = GLoRAModule(KEY, layer, 1.0, lora_dim=4, alpha=2)
    randomise(module, seed=14)
    sd = saved(module)
    assert set(sd) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}
    assert not torch.is_floating_point(sd["alpha"])  # LyCORIS itself saves an integer alpha here
    _check(module, layer, sd, GLoRA)


def test_glora_tucker_core_matches_lycoris_formula() -> None:
    """bm.weight (a Tucker core for B) against LyCORIS's own GLoRA weight function."""
    g = torch.Generator().manual_seed(15)
    w = torch.randn(24, 32, 3, 3, generator=g)
    t = {"a1.weight": torch.randn(32, 4, 1, 1, generator=g), "a2.weight": torch.randn(4, 32, 1, 1, generator=g),
         "b1.weight": torch.randn(24, 4, 1, 1, generator=g), "b2.weight": torch.randn(4, 32, 1, 1, generator=g),
         "bm.weight": torch.randn(4, 4, 3, 3, generator=g), "alpha": torch.tensor(2.0)}
    adapter = make_adapter("x", t)
    ref = _glora_weight(w, t["a1.weight"], t["a2.weight"], t["b1.weight"], t["b2.weight"], t["bm.weight"], 0.5)
    for m in MULTIPLIERS:
        assert_close(deltas(adapter, w, None, m)[0], ref * m)


# --------------------------------------------------------------------------- composition and errors


def test_oft_and_lora_on_one_layer_compose_against_the_original() -> None:
    """Each delta is taken against the original weight: W + (R^T W - W) + up @ down, restored bitwise."""
    from tiny_models import build_hf_clip

    te = build_hf_clip()
    mm = ModelMap.build("sd1", None, [("te", te)])
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    layer = mm.get(key).module
    w0 = layer.weight.detach().clone()
    oft_module = DiagOFTModule(key, layer, 1.0, lora_dim=4, constraint=0.0, rescaled=True)
    _randomise_oft(oft_module, seed=16)
    lora_module = LoConModule(key, layer, 1.0, lora_dim=4, alpha=2)
    randomise(lora_module, seed=17)
    oft = parse_state_dict("oft", {f"{key}.{k}": v for k, v in saved(oft_module).items()}, {})
    lora = parse_state_dict("lora", {f"{key}.{k}": v for k, v in saved(lora_module).items()}, {})
    # references first: LyCORIS's modules read the layer's current weight
    ref_oft, ref_lora = merged_delta(oft_module, w0, None, 0.8)[0], merged_delta(lora_module, w0, None, 0.5)[0]
    before = snapshot(te)
    p = Patcher(mm)
    assert not p.apply([activation(oft, 0.8), activation(lora, 0.5)]).messages
    assert_close(layer.weight.detach() - w0, ref_oft + ref_lora)
    assert not p.apply([activation(lora, 0.5)]).messages  # dropping the OFT re-merges from the original
    assert_close(layer.weight.detach() - w0, ref_lora)
    p.restore()
    assert same(before, snapshot(te))


def test_oft_bad_shapes_raise() -> None:
    r = torch.randn
    lin = r(12, 16)

    def raises(tensors, weight=None):
        with pytest.raises(AdapterError):
            a = make_adapter("x", tensors)
            if weight is not None:
                deltas(a, weight, None, 1.0)

    raises({"oft_blocks": r(3, 4, 5)})                          # blocks not square
    raises({"oft_blocks": r(5, 4, 4)}, lin)                     # 5 x 4 rows != 12
    raises({"oft_blocks": r(3, 4, 4), "oft_diag": r(3, 4, 4)})  # two stored forms at once
    raises({"oft_blocks": r(3, 4, 4), "rescale": r(7)}, lin)    # rescale for other channels
    raises({"kohya_oft_blocks": r(3, 4, 4)})                    # sd-scripts' files always have alpha
    raises({"oft_blocks": r(3, 4, 4), "dora_scale": r(12, 1)})
    raises({"oft_blocks": r(2, 3, 3, 3)})                       # BOFT blocks of odd size
    raises({"oft_blocks": r(3, 3, 4, 4)})                       # 3 stages need blocks in fours
    raises({"oft_blocks": r(2, 2, 4, 4)}, lin)                  # 2 x 4 rows != 12
    raises({"oft_blocks": r(3, 4, 4)}, r(12))                   # a bias-like 1-D weight
    raises({"a1.weight": r(16, 4), "a2.weight": r(3, 16), "b1.weight": r(12, 4), "b2.weight": r(4, 16)})
    raises({"a1.weight": r(16, 4), "a2.weight": r(4, 16), "b1.weight": r(12, 3), "b2.weight": r(4, 16)})
    raises({"a1.weight": r(8, 4), "a2.weight": r(4, 8), "b1.weight": r(12, 4), "b2.weight": r(4, 8)}, lin)
