"""Our training metadata against sd-scripts v0.10.1's, key by key (issue 14: files and metadata).

The reference, tests/data/sd_scripts_v0.10.1_lora_header.json, is transcribed from sd-scripts'
source at that tag (its ``_source`` names the files and lines): every key train_network.py writes
for a LoRA trained on --train_data_dir folders, the format of its value, and the value it writes
for options left at their defaults.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lib_lora.fileio import read_header
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.network import NetworkConfig
from lib_lora.training.config import TrainConfig
from lib_lora.training.plan import make_plan
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1, build_sd2
from train_support import make_dataset, trainable

REFERENCE = json.loads((Path(__file__).parent / "data" / "sd_scripts_v0.10.1_lora_header.json").read_text())
QUIET = Callbacks(log=lambda s: None)

_NUMBER = {
    "int": r"-?\d+",
    "float": r"-?(\d+\.\d*(e[-+]\d+)?|\d+e[-+]\d+|inf|nan)",
    "bool": r"True|False",
    "hex40": r"[0-9a-f]{40}", "hex64": r"[0-9a-f]{64}", "hex8": r"[0-9a-f]{8}",
    "reso_tuple": r"\(\d+, \d+\)",
    "optimizer": r"[\w.]+\.\w+(\(.*\))?",
    "iso_seconds": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d",
    "tool_revision": r"[\w.-]+/[0-9a-f]{40}",
}


def matches(fmt: str, value: str) -> bool:
    """Whether ``value`` is written in the reference's format ``fmt``."""
    if fmt.endswith("|None") and value == "None":
        return True
    fmt = fmt.removesuffix("|None")
    if fmt == "None":
        return value == "None"
    if fmt == "str":
        return isinstance(value, str)
    if fmt.startswith("json_object"):
        data = json.loads(value)
        return isinstance(data, dict) or (data is None and fmt == "json_object|null")
    return re.fullmatch(_NUMBER[fmt], value) is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=3, repeats=2)


def train(data: Path, out: Path, vae, buckets: bool = True, tiny=None, **kw) -> list[Path]:
    """3 images x 2 repeats at batch 2: 3 steps an epoch; 5 steps, saving every 2."""
    ds = DatasetConfig(data, resolution=64, enable_buckets=buckets, min_bucket_reso=64, max_bucket_reso=128)
    cfg = TrainConfig(ds, NetworkConfig(rank=2, alpha=2, conv_rank=2, conv_alpha=1), output_dir=out, output_name="m",
                      max_train_steps=5, batch_size=2, save_every_n_steps=2, learning_rate=1e-3,
                      save_precision="fp32", **kw)
    return Trainer(trainable(tiny or build_sd1(seed=0), vae), make_plan(cfg), QUIET).run().saved


def test_every_key_sd_scripts_writes_in_its_format(tmp_path, data, vae):
    saved = train(data, tmp_path, vae)
    assert [p.name for p in saved] == ["m-step00000002.safetensors", "m-step00000004.safetensors", "m.safetensors"]
    expected_ss = set(REFERENCE["ss"]) | {"ss_network_args"}  # conv_dim: kohya's --network_args
    for path in saved:
        meta = read_header(path).metadata
        assert {k for k in meta if k.startswith("ss_")} == expected_ss, path.name
        assert {k for k in meta if k.startswith("modelspec.")} == set(REFERENCE["modelspec"])
        assert {k for k in meta if k.startswith("sshs_")} == set(REFERENCE["sshs"])
        for group in ("ss", "sshs", "modelspec"):
            for key, ref in REFERENCE[group].items():
                assert matches(ref["format"], meta[key]), (path.name, key, meta[key], ref["format"])
                if "value" in ref:
                    assert meta[key] == ref["value"], (path.name, key)
        args = json.loads(meta["ss_network_args"])
        assert args == {"conv_dim": "2", "conv_alpha": "1", "dropout": None}
        assert meta["ss_training_finished_at"] != "None"  # on every save, as sd-scripts writes it
    final = read_header(saved[-1]).metadata
    # 5 steps of 3 an epoch: 2 epochs; the step saves record the epoch they fall in, counted from 0
    assert [read_header(p).metadata["ss_epoch"] for p in saved] == ["0", "1", "2"]
    assert (final["ss_num_epochs"], final["ss_steps"], final["ss_max_train_steps"]) == ("2", "5", "5")
    assert (final["ss_num_train_images"], final["ss_num_batches_per_epoch"]) == ("6", "3")
    assert final["ss_network_alpha"] == "2.0" and final["ss_learning_rate"] == "0.001"
    assert (final["ss_unet_lr"], final["ss_text_encoder_lr"], final["ss_clip_skip"]) == ("None", "None", "None")
    assert int(final["ss_session_id"]) >= 0
    assert read_header(saved[0]).metadata["ss_session_id"] == final["ss_session_id"]
    assert final["modelspec.sai_model_spec"] == "1.0.1" and final["modelspec.prediction_type"] == "epsilon"
    assert final["lora_workshop.version"] == __import__("lib_lora").__version__
    info = json.loads(final["ss_bucket_info"])
    assert set(info) == set(REFERENCE["bucket_info"]["keys"])
    assert info["buckets"] == {"0": {"resolution": [64, 64], "count": 6}} and info["mean_img_ar_error"] == 0
    assert (final["ss_min_bucket_reso"], final["ss_max_bucket_reso"]) == ("64", "128")


def test_without_buckets_the_bucket_keys_are_none(tmp_path, data, vae):
    meta = read_header(train(data, tmp_path, vae, buckets=False)[-1]).metadata
    assert meta["ss_bucket_info"] == "null" and meta["ss_enable_bucket"] == "False"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"], meta["ss_bucket_no_upscale"]) == \
        ("None", "None", "False")


def test_options_given_are_written_as_sd_scripts_writes_them(tmp_path, data, vae):
    saved = train(data, tmp_path, vae, unet_lr=2e-3, text_encoder_lr=5e-4, clip_skip=1, prior_loss_weight=0.5,
                  weight_decay=0.1, v_parameterization=True, tiny=build_sd2(seed=0))
    meta = read_header(saved[-1]).metadata
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"], meta["ss_clip_skip"]) == ("0.002", "0.0005", "1")
    assert meta["ss_prior_loss_weight"] == "0.5" and meta["modelspec.encoder_layer"] == "1"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["modelspec.prediction_type"]) == ("True", "sd_v2_v", "v")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
