"""A non-finite value never reaches the model, and one bad file never takes the others down
(hardening, runtime side).  References: the model patched with the good files alone."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lib_lora import cli
from lib_lora.fileio import save_safetensors
from lib_lora.modelmap import ModelMap
from lib_lora.network import parse_state_dict
from lib_lora.params import parse_prompt, requests_from_items
from lib_lora.patcher import Patcher
from loras import activation, kohya_lora, same, snapshot
from tiny_models import build_sd1

TOY = Path(__file__).resolve().parent.parent / "lib_lora" / "toyworld" / "assets" / "toy-sd1.safetensors"


def modules(tiny):
    return [tiny.unet] + [m for _, m in tiny.text_encoders]


def setup(dtype=torch.float32):
    tiny = build_sd1(seed=0)
    for m in modules(tiny):
        m.to(dtype)
    mm = ModelMap.build(tiny.family, tiny.unet, tiny.text_encoders)
    a = parse_state_dict("a", kohya_lora(mm, rank=4, seed=1), {})
    b = parse_state_dict("b", kohya_lora(mm, rank=4, seed=2, scale=3.0), {})
    return tiny, mm, a, b


def finite(tiny) -> bool:
    return all(torch.isfinite(p).all() for m in modules(tiny) for p in m.parameters())


def with_only(tiny, acts) -> list[torch.Tensor]:
    """The weights a copy of the model has with just ``acts`` merged: the reference."""
    ref = copy.deepcopy(tiny)
    Patcher(ModelMap.build(ref.family, ref.unet, ref.text_encoders)).apply(acts)
    return snapshot(*modules(ref))


@pytest.mark.parametrize("items", [["x", "nan"], ["x", "inf"], ["x", "-inf"], ["x", "1e400"], ["x", "te=nan"],
                                   ["x", "1", "unet=inf"], ["x", "0.5", "1e999"],
                                   ["x", "1e39"]])
def test_non_finite_weights_are_refused_when_the_prompt_is_read(items):
    requests, messages = requests_from_items([items, ["y", "0.5"]])
    assert [r.name for r in requests] == ["y"]
    assert len(messages) == 1 and "finite" in messages[0] and "<lora:x>" in messages[0]


def test_non_finite_block_weights_fall_back_to_the_plain_weight():
    requests, _ = requests_from_items([["x", "1", "lbw=1,nan,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"], ["x", "1", "x=inf",
                                                                                           "lbw=XYZ"]])
    assert all(r.blocks is None and r.warnings for r in requests)


def test_cli_prompt_parsing_keeps_good_tokens():
    errors: list[str] = []
    text, reqs = parse_prompt("a <lora:x:nan> b <lora:y:0.5>", errors=errors)
    assert [r.name for r in reqs] == ["y"] and len(errors) == 1 and text == "a  b "


def test_overflowing_network_is_left_out_and_the_others_apply():
    tiny, mm, a, b = setup()
    before = snapshot(*modules(tiny))
    want = with_only(tiny, [activation(a, 1.0, 1.0)])
    p = Patcher(mm)
    rep = p.apply([activation(a, 1.0, 1.0), activation(b, 3e38, 3e38)])  # a float32 weight, an infinite product
    assert finite(tiny)
    assert "b" in rep.skipped and "b" not in rep.applied and rep.applied["a"] > 0
    assert any(m.startswith("b:") and "overflow" in m for m in rep.messages)
    assert same(snapshot(*modules(tiny)), want)
    p.restore()
    assert same(snapshot(*modules(tiny)), before)


def test_overflow_after_an_earlier_merge_keeps_the_earlier_one():
    """The second apply re-merges in place; a refused network must leave no half-written weight."""
    tiny, mm, a, b = setup()
    want = with_only(tiny, [activation(a, 1.0, 1.0)])
    p = Patcher(mm)
    p.apply([activation(a, 1.0, 1.0), activation(b, 0.5, 0.5)])
    rep = p.apply([activation(a, 1.0, 1.0), activation(b, 3e38, 3e38)])
    assert "b" in rep.skipped and finite(tiny)
    assert same(snapshot(*modules(tiny)), want)


def test_half_model_refuses_a_weight_its_dtype_cannot_hold():
    tiny, mm, a, _ = setup(torch.float16)
    before = snapshot(*modules(tiny))
    rep = Patcher(mm).apply([activation(a, 1e6, 1e6)])  # fine in float32, inf once cast to float16
    assert rep.skipped == ["a"] and finite(tiny)
    assert same(snapshot(*modules(tiny)), before)


def test_a_file_that_breaks_the_maths_is_only_its_own_error(monkeypatch):
    tiny, mm, a, b = setup()
    want = with_only(tiny, [activation(a, 1.0, 1.0)])
    for adapter in b.adapters.values():
        monkeypatch.setattr(adapter, "add_delta_", lambda *args, **kw: torch.ones(3, 5) @ torch.ones(4, 2))
    rep = Patcher(mm).apply([activation(b, 1.0, 1.0), activation(a, 1.0, 1.0)])
    assert rep.applied["a"] > 0 and "b" not in rep.applied
    assert any(m.startswith("b:") and "RuntimeError" in m for m in rep.messages)
    assert same(snapshot(*modules(tiny)), want)


def test_cli_render_reports_bad_loras_without_a_traceback(tmp_path, capsys):
    loras = tmp_path / "loras"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(0, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 0)},
                     loras / "rank0.safetensors")
    code = cli.main(["render", "a red circle <lora:rank0:1> <lora:other:nan> <lora:missing:1>", "--base", str(TOY),
                     "--lora-dir", str(loras), "--steps", "1", "--width", "64", "--height", "64",
                     "--out", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "r.png").exists()
    assert "Traceback" not in err
    assert "rank0" in err and "other" in err and "missing" in err


def test_scheduled_network_that_would_overflow_is_left_out():
    tiny, mm, a, b = setup(torch.float16)
    before = snapshot(*modules(tiny))
    p = Patcher(mm)
    rep = p.apply([activation(b, 1.0, 1e6, stop=5)])  # hooked, not merged: the same check applies
    assert rep.skipped == ["b"] and not p.bypass.terms
    assert any("overflow" in m for m in rep.messages)
    p.restore()
    assert same(snapshot(*modules(tiny)), before)
