"""kohya's options the trainer now has (issue 14): network_weights, prior_loss_weight, unet_lr,
v_parameterization, and clip_skip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_lora.fileio import LoraFileError, load_safetensors, save_safetensors
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.errors import RequestError
from lib_lora.training.network import NetworkConfig
from lib_lora.training.options import OptionError
from lib_lora.training.config import TrainConfig
from lib_lora.training.plan import make_plan
from lib_lora.training.request import build_request
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1, build_sd2
from train_support import make_dataset, trainable

QUIET = Callbacks(log=lambda s: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=2, repeats=1)


def config(data: Path, out: Path, network: NetworkConfig | None = None, reg: Path | None = None, **kw) -> TrainConfig:
    ds = DatasetConfig(data, reg_dir=reg, resolution=64, enable_buckets=False)
    base = dict(output_dir=out, output_name="k", max_train_steps=2, learning_rate=1e-3, save_precision="fp32",
                network=network or NetworkConfig(rank=2, alpha=2, conv_rank=2, conv_alpha=1))
    return TrainConfig(ds, **{**base, **kw})


@pytest.fixture(scope="module")
def start_file(tmp_path_factory, data, vae) -> Path:
    """A LoRA/LoCon trained for 2 steps: its up weights are no longer zero."""
    out = tmp_path_factory.mktemp("start")
    return Trainer(trainable(build_sd1(seed=0), vae), make_plan(config(data, out)), QUIET).run().output


def test_network_weights_is_where_the_first_step_starts(tmp_path, data, vae, start_file):
    start, _ = load_safetensors(start_file)
    assert any(v.abs().max() > 0 for k, v in start.items() if "lora_up" in k)
    # one step at a learning rate so small that Adam's move (about lr per weight) is invisible next
    # to the trained weights: the file written after it is the file started from
    res = Trainer(trainable(build_sd1(seed=0), vae),
                  make_plan(config(data, tmp_path, network_weights=str(start_file), max_train_steps=1,
                                   learning_rate=1e-10)), QUIET).run()
    after, _ = load_safetensors(res.output)
    assert after.keys() == start.keys()
    for k in start:
        torch.testing.assert_close(after[k], start[k], rtol=0, atol=1e-8)
    fresh, _ = load_safetensors(Trainer(trainable(build_sd1(seed=0), vae), make_plan(
        config(data, tmp_path / "fresh", max_train_steps=1, learning_rate=1e-10)), QUIET).run().output)
    assert any(not torch.allclose(fresh[k], start[k], atol=1e-6) for k in start)  # the test can tell them apart


@pytest.mark.parametrize("network,message", [
    (NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1), "rank 2"),
    (NetworkConfig(rank=2, alpha=1, conv_rank=2, conv_alpha=1), "alpha 2"),
    (NetworkConfig(rank=2, alpha=2), "not trained with these settings"),  # the file's LoCon layers
])
def test_network_weights_that_do_not_fit_are_refused(tmp_path, data, vae, start_file, network, message):
    tiny = build_sd1(seed=0)
    plan = make_plan(config(data, tmp_path, network=network, network_weights=str(start_file)))
    with pytest.raises(LoraFileError, match=message):
        Trainer(trainable(tiny, vae), plan, QUIET).run()
    assert not list(tmp_path.glob("*.safetensors"))


def test_network_weights_must_be_a_lora(tmp_path, data, vae):
    odd = tmp_path / "loha.safetensors"
    save_safetensors({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, odd, {})
    with pytest.raises(LoraFileError, match="not a LoRA/LoCon weight"):
        Trainer(trainable(build_sd1(seed=0), vae), make_plan(config(data, tmp_path, network_weights=str(odd))),
                QUIET).run()


def test_requests_name_network_weights_inside_the_lora_folder(tmp_path, data, start_file):
    body = {"output_name": "x", "dataset": {"train_dir": str(data)}}
    folder = start_file.parent
    req = build_request({**body, "network_weights": start_file.name}, folder)
    assert req.config.network_weights == str(start_file)
    with pytest.raises(RequestError, match="inside the LoRA folder"):
        build_request({**body, "network_weights": str(start_file)}, tmp_path, dataset_roots=[data.parent])
    with pytest.raises(RequestError, match="file not found"):
        build_request({**body, "network_weights": "missing.safetensors"}, folder)


def test_prior_loss_weight_scales_the_regularisation_images_loss(tmp_path, data, vae):
    """Two training and two regularisation images in one batch of 4: the first step's loss is
    (sum over training images + w * sum over regularisation images) / 4, so it is linear in w."""
    reg = make_dataset(tmp_path / "reg", n=2, repeats=1, trigger="square", seed=1)

    def first_loss(w: float) -> float:
        cfg = config(data, tmp_path / f"w{w}", reg=reg, prior_loss_weight=w, batch_size=4, max_train_steps=1)
        return Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg), QUIET).run().losses[0]

    l0, l1, l3 = first_loss(0.0), first_loss(1.0), first_loss(3.0)
    assert l1 > l0 > 0
    assert l3 == pytest.approx(l0 + 3 * (l1 - l0), rel=1e-5)


def test_unet_lr_and_text_encoder_lr_default_to_the_learning_rate(data, tmp_path, vae):
    cfg = config(data, tmp_path, unet_lr=2e-3)
    assert (cfg.unet_learning_rate, cfg.text_encoder_learning_rate) == (2e-3, 1e-3)
    seen = []
    Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg), Callbacks(on_progress=lambda p: seen.append(p.lr),
                                                                          log=lambda s: None)).run()
    assert seen == [2e-3, 2e-3]  # the UNet's group, at a constant schedule


def test_v_parameterization_says_what_the_model_predicts(data, tmp_path, vae):
    eps = trainable(build_sd1(seed=0), vae)
    assert Trainer(eps, make_plan(config(data, tmp_path, v_parameterization=True))).model.prediction == "v"
    v_model = trainable(build_sd2(seed=0), vae, prediction="v")
    assert Trainer(v_model, make_plan(config(data, tmp_path))).model.prediction == "v"  # unset: the model's
    assert Trainer(v_model, make_plan(config(data, tmp_path, v_parameterization=False))).model.prediction == "epsilon"
    assert v_model.prediction == "v"  # the host's model object is left as it was


def test_clip_skip_is_accepted_within_the_text_encoders_layers(data, tmp_path):
    """Clip skip 2 and above are trained now (tests/test_clip_skip.py checks the conditioning)."""
    assert config(data, tmp_path, clip_skip=1).clip_skip == 1
    assert config(data, tmp_path, clip_skip=2).clip_skip == 2
    for bad in (0, 13):
        with pytest.raises(OptionError, match="clip_skip: must be a whole number at least 1 and at most 12"):
            config(data, tmp_path, clip_skip=bad)
