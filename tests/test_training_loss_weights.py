"""Per-timestep loss weights and the timestep range, against hand-computed values."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.checks import timestep_range
from lib_lora.training.options import OptionError
from lib_lora.training.optim import debiased_weights, snr_weights
from lib_lora.training.plan import make_plan
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable

# alphas_cumprod -> SNR = acp / (1 - acp): 1, 9, 999999 (capped at 1000 by debiased estimation), 1/99
ACP = torch.tensor([0.5, 0.9, 0.999999, 0.01], dtype=torch.float64)


def test_debiased_estimation_weights_by_hand():
    eps = [1.0, 1 / 3, 1 / math.sqrt(1000), math.sqrt(99)]
    v = [1 / 2, 1 / 10, 1 / 1001, 1 / (1 + 1 / 99)]
    assert debiased_weights(ACP, "epsilon").tolist() == pytest.approx(eps, rel=1e-6)
    assert debiased_weights(ACP, "v").tolist() == pytest.approx(v, rel=1e-6)


def test_min_snr_weights_by_hand():
    # min(SNR, 5) / SNR for epsilon, min(SNR, 5) / (SNR + 1) for v
    eps = [1.0, 5 / 9, 5 / 999999, 1.0]
    v = [1 / 2, 5 / 10, 5 / 1000000, (1 / 99) / (1 + 1 / 99)]
    assert snr_weights(ACP, 5.0, "epsilon").tolist() == pytest.approx(eps, rel=1e-5)
    assert snr_weights(ACP, 5.0, "v").tolist() == pytest.approx(v, rel=1e-5)


def test_timestep_bounds_are_checked(tmp_path):
    ds = DatasetConfig(tmp_path, resolution=64)
    assert TrainConfig(ds, min_timestep=200, max_timestep=1000).min_timestep == 200
    with pytest.raises(OptionError, match="min_timestep"):
        TrainConfig(ds, min_timestep=500, max_timestep=500)
    with pytest.raises(OptionError, match="max_timestep"):
        TrainConfig(ds, max_timestep=0)


def test_timesteps_are_bounded_by_the_1000_step_schedule(tmp_path):
    """sd-scripts' bounds (min 0..999, max 1..1000): refused when asked, not at step 1 or silently clamped."""
    ds = DatasetConfig(tmp_path, resolution=64)
    assert TrainConfig(ds, min_timestep=999).min_timestep == 999      # [999, 1000): the last timestep only
    assert TrainConfig(ds, max_timestep=1000).max_timestep == 1000
    with pytest.raises(OptionError, match="min_timestep: must be a whole number at least 0 and at most 999"):
        TrainConfig(ds, min_timestep=1000)
    with pytest.raises(OptionError, match="max_timestep: must be a whole number at least 1 and at most 1000"):
        TrainConfig(ds, max_timestep=1001)


def test_training_timesteps_stay_in_min_max(tmp_path, vae):
    """Every timestep the UNet sees during training lies in [min_timestep, max_timestep)."""
    make_dataset(tmp_path / "data")
    model = trainable(build_sd1(seed=0), vae)
    seen: list[int] = []
    predict = model.predict
    model.predict = lambda x, t, cond: (seen.extend(t.tolist()), predict(x, t, cond))[1]
    cfg = TrainConfig(DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False),
                      output_dir=tmp_path / "out", output_name="t", max_train_steps=12, batch_size=4,
                      min_timestep=700, max_timestep=760, debiased_estimation_loss=True, seed=3)
    res = Trainer(model, make_plan(cfg, log=lambda m: None), Callbacks(log=lambda m: None)).run()
    assert res.steps == 12 and all(math.isfinite(x) for x in res.losses)
    assert len(seen) == 48 and min(seen) >= 700 and max(seen) < 760 and len(set(seen)) > 10


def test_timestep_range_by_hand():
    """[lo, hi) for a schedule of 500 steps: max_timestep beyond it is capped with a warning, a min_timestep
    at or beyond its end is refused, anything inside it is kept as given."""
    assert timestep_range(None, None, 500) == (0, 500, None)
    assert timestep_range(100, 400, 500) == (100, 400, None)
    assert timestep_range(None, 500, 500) == (0, 500, None)
    lo, hi, note = timestep_range(100, 1000, 500)
    assert (lo, hi) == (100, 500)
    assert note.startswith("warning: max_timestep 1000 is beyond this model's noise schedule of 500 timesteps")
    assert "[100, 500)" in note
    with pytest.raises(OptionError, match=r"min_timestep: 500 is beyond this model's noise schedule of 500 "
                                          r"timesteps \(0 to 499\)"):
        timestep_range(500, None, 500)


def test_max_timestep_beyond_a_short_schedule_is_logged_and_capped(tmp_path, vae):
    """A model whose schedule has 300 steps: max_timestep 1000 draws below 300, and the run says so before
    anything is cached; min_timestep 300 is refused when the trainer is built."""
    make_dataset(tmp_path / "data")
    model = trainable(build_sd1(seed=0), vae)
    model = dataclasses.replace(model, alphas_cumprod=model.alphas_cumprod[:300])
    seen: list[int] = []
    predict = model.predict
    model.predict = lambda x, t, cond: (seen.extend(t.tolist()), predict(x, t, cond))[1]
    cfg = TrainConfig(DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False),
                      output_dir=tmp_path / "out", output_name="t", max_train_steps=6, batch_size=4,
                      min_timestep=250, max_timestep=1000, seed=3)
    log: list[str] = []
    Trainer(model, make_plan(cfg, log=lambda m: None), Callbacks(log=log.append)).run()
    assert log[0] == ("warning: max_timestep 1000 is beyond this model's noise schedule of 300 timesteps: "
                      "training timesteps are drawn from [250, 300) instead")
    assert len(seen) == 24 and min(seen) >= 250 and max(seen) < 300
    with pytest.raises(OptionError, match="min_timestep: 300 is beyond"):
        Trainer(model, make_plan(dataclasses.replace(cfg, min_timestep=300, overwrite=True), log=lambda m: None),
                Callbacks(log=log.append))
