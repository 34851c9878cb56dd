"""kohya's full_fp16 / full_bf16: the LoRA's weights and optimiser state in half precision, the loss scale and
the guard that keeps non-finite weights out, and the saved file (on the CPU)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from lib_lora.training import trainer as trainer_module
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.half_weights import GROWTH_INTERVAL, INIT_SCALE, HalfStep, weight_dtype
from lib_lora.training.options import OptionError
from lib_lora.training.plan import make_plan
from lib_lora.training.request import build_request
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable


def test_each_switch_needs_its_mixed_precision(tmp_path):
    ds = DatasetConfig(tmp_path, resolution=64)
    assert TrainConfig(ds, mixed_precision="fp16", full_fp16=True).full_fp16
    assert TrainConfig(ds, mixed_precision="bf16", full_bf16=True).full_bf16
    with pytest.raises(OptionError, match="full_fp16: needs mixed_precision fp16 \\(got no\\)"):
        TrainConfig(ds, full_fp16=True)
    with pytest.raises(OptionError, match="full_bf16: needs mixed_precision bf16 \\(got fp16\\)"):
        TrainConfig(ds, mixed_precision="fp16", full_bf16=True)
    with pytest.raises(OptionError, match="full_bf16"):
        TrainConfig(ds, mixed_precision="fp16", full_fp16=True, full_bf16=True)
    assert weight_dtype(True, False) is torch.float16 and weight_dtype(False, True) is torch.bfloat16
    assert weight_dtype(False, False) is None


def test_auto_mixed_precision_follows_the_switch(tmp_path):
    make_dataset(tmp_path / "data")
    body = {"output_name": "h", "dataset": {"train_dir": str(tmp_path / "data")}, "full_bf16": True}
    req = build_request(body, output_dir=tmp_path / "out")
    assert req.config.mixed_precision == "bf16" and not req.auto_precision
    assert not build_request({**body, "full_bf16": False}, output_dir=tmp_path / "out").config.full_bf16


def _param(values, dtype):
    p = torch.nn.Parameter(torch.tensor(values, dtype=dtype))
    p.grad = torch.zeros_like(p)
    return p


def test_a_step_with_a_non_finite_gradient_is_skipped_and_the_fp16_scale_backs_off():
    p = _param([1.0, 2.0], torch.float16)
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    log: list[str] = []
    hs = HalfStep(torch.float16, log.append)
    assert hs.loss_scale == INIT_SCALE == 65536.0
    assert hs.scale(torch.tensor(2.0)).item() == 131072.0
    p.grad.copy_(torch.tensor([65536.0 * 0.5, 65536.0 * -0.25]).half())   # scaled gradients: finite
    hs.step(opt)
    hs.update()
    # Adam's first step moves each weight by lr against its gradient's sign: 1 - 0.1, 2 + 0.1
    assert p.tolist() == pytest.approx([0.9, 2.1], abs=2e-3) and hs.skipped == 0
    assert opt.state[p]["exp_avg"].dtype is torch.float16
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad.copy_(torch.tensor([float("inf"), 1.0]))
    hs.step(opt)
    hs.update()
    assert torch.equal(p.detach(), before) and hs.skipped == 1 and hs.loss_scale == 32768.0
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert log == ["half-precision weights: step skipped (a gradient is not finite at loss scale 65536); "
                   "1 skipped so far"]


def test_an_update_that_makes_a_weight_non_finite_is_undone():
    """bf16 (no loss scale): gradients finite, but an infinite learning rate makes the update NaN: the
    weights and the optimiser state are put back as they were."""
    p = _param([1.0, -1.0], torch.bfloat16)
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    hs = HalfStep(torch.bfloat16, lambda m: None)
    assert hs.loss_scale == 1.0
    p.grad.copy_(torch.tensor([0.5, 0.5]))
    hs.step(opt)
    hs.update()
    assert p.tolist() == [0.5, -1.5]
    good, buf = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = float("inf")
    p.grad.copy_(torch.tensor([0.0, 0.5]))    # inf * 0 is NaN, inf * x is inf
    hs.step(opt)
    hs.update()
    assert torch.equal(p.detach(), good) and torch.equal(opt.state[p]["momentum_buffer"], buf) and hs.skipped == 1


def test_the_fp16_scale_grows_after_good_steps():
    p = _param([1.0], torch.float16)
    opt = torch.optim.SGD([p], lr=0.0)
    hs = HalfStep(torch.float16, lambda m: None)
    for _ in range(GROWTH_INTERVAL):
        p.grad.fill_(1.0)
        hs.step(opt)
        hs.update()
    assert hs.loss_scale == 2 * INIT_SCALE


@pytest.mark.parametrize("switch, precision, dtype", [("full_bf16", "bf16", torch.bfloat16),
                                                      ("full_fp16", "fp16", torch.float16)])
def test_a_run_trains_the_lora_in_half_and_skips_a_non_finite_step(tmp_path, vae, monkeypatch, switch, precision,
                                                                   dtype):
    make_dataset(tmp_path / "data")
    model = trainable(build_sd1(seed=0), vae)
    opts = []
    make = trainer_module.make_optimizer
    monkeypatch.setattr(trainer_module, "make_optimizer", lambda *a: (lambda r: (opts.append(r[0]), r)[1])(make(*a)))
    calls = {"n": 0}
    predict = model.predict

    def poisoned(x, t, cond):   # the 4th forward (step 4 of batch 1) sends back an infinite gradient
        out = predict(x, t, cond)
        calls["n"] += 1
        if calls["n"] == 4:
            out.register_hook(lambda g: g * float("inf"))
        return out
    model.predict = poisoned
    saves: dict[int, dict] = {}

    def between(b):
        saves[b.step] = {k: v.clone() for k, v in b.contents()[0].items()}
    cfg = TrainConfig(DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False),
                      output_dir=tmp_path / "out", output_name="h", max_train_steps=6, batch_size=2,
                      learning_rate=1e-3, mixed_precision=precision, save_precision="fp32", **{switch: True})
    log: list[str] = []
    res = Trainer(model, make_plan(cfg, log=lambda m: None), Callbacks(log=log.append, between_steps=between)).run()
    opt = opts[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(p.dtype is dtype for p in params)
    assert all(v.dtype is dtype for p in params for k, v in opt.state[p].items() if k != "step")
    assert any("step skipped (a gradient is not finite" in line for line in log)
    # the skipped step changed nothing; the others trained
    assert all(torch.equal(saves[4][k], saves[3][k]) for k in saves[3])
    assert any(not torch.equal(saves[5][k], saves[4][k]) for k in saves[4])
    ups = [v for k, v in saves[5].items() if k.endswith("lora_up.weight")]
    assert any(v.abs().max() > 0 for v in ups)   # the up weights start at zero
    assert res.steps == 6 and all(math.isfinite(x) for x in res.losses)
    # the file: fp32 as asked, exactly the half weights widened, finite, and kohya's ss_full_fp16
    with safe_open(str(res.output), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype is torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert all(torch.equal(t, t.to(dtype).float()) for k, t in tensors.items() if not k.endswith("alpha"))
    assert meta["ss_full_fp16"] == str(switch == "full_fp16")   # sd-scripts writes Python's "True"/"False"
    assert meta["ss_mixed_precision"] == precision


def test_a_half_run_resumes_exactly(tmp_path, vae):
    """bf16 weights and optimiser state go into the state file and come back: 6 steps straight equal 3 steps,
    then 3 more resumed from the step-3 state, bit for bit."""
    from lib_lora.fileio import load_safetensors
    from lib_lora.training.state import state_path
    make_dataset(tmp_path / "data")

    def cfg(out: str, **kw) -> TrainConfig:
        return TrainConfig(DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False),
                           output_dir=tmp_path / out, output_name="h", max_train_steps=6, batch_size=2,
                           learning_rate=1e-3, mixed_precision="bf16", full_bf16=True, save_precision="fp32", **kw)
    quiet = Callbacks(log=lambda m: None)
    straight = Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg("a")), quiet).run()
    first = Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg("b", save_every_n_steps=3, save_state=True)),
                    quiet).run()
    resumed = Trainer(trainable(build_sd1(seed=0), vae),
                      make_plan(cfg("b", overwrite=True), resume_from=state_path(first.saved[0])), quiet).run()
    a, b = load_safetensors(straight.output)[0], load_safetensors(resumed.output)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_adamw_gets_an_eps_fp16_can_use(tmp_path, vae, monkeypatch):
    """With fp16 state, Adam's second moment (1 - 0.999) g^2 is 0 for |g| below about 5.5e-3 (fp16's smallest
    step is 6e-8), so the step is lr * m / eps: torch's eps 1e-8 blows the weights up (the loss is NaN within a
    few steps on the tiny SD1 at lr 5e-3), the default 1e-4 here trains; an eps the user gives is kept."""
    from lib_lora.training.half_weights import FP16_ADAMW_EPS, adamw_eps
    from lib_lora.training.network import NetworkConfig
    assert torch.tensor(0.001 * 5.4e-3 ** 2).half().item() == 0.0 and torch.tensor(1e-8).half().item() == 0.0
    assert adamw_eps("AdamW", True, {}) == FP16_ADAMW_EPS == 1e-4
    assert adamw_eps("AdamW", True, {"eps": 1e-6}) is None and adamw_eps("AdamW", False, {}) is None
    assert adamw_eps("Lion", True, {}) is None
    make_dataset(tmp_path / "data")
    opts = []
    make = trainer_module.make_optimizer
    monkeypatch.setattr(trainer_module, "make_optimizer", lambda *a: (lambda r: (opts.append(r[0]), r)[1])(make(*a)))

    def run(out: str, **kw):
        cfg = TrainConfig(DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False),
                          NetworkConfig(rank=8, alpha=8, conv_rank=4, conv_alpha=4), output_dir=tmp_path / out,
                          output_name="h", max_train_steps=12, batch_size=2, learning_rate=5e-3,
                          mixed_precision="fp16", full_fp16=True, **kw)
        log: list[str] = []
        return Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg), Callbacks(log=log.append)).run(), log
    res, log = run("a")
    assert opts[-1].param_groups[0]["eps"] == 1e-4 and any("AdamW's eps is 0.0001" in line for line in log)
    assert res.steps == 12 and all(math.isfinite(x) for x in res.losses)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        run("b", optimizer_args={"eps": 1e-8})
    assert opts[-1].param_groups[0]["eps"] == 1e-8
