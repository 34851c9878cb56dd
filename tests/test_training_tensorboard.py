"""TensorBoard logging (issue 14): kohya's --log_with tensorboard --logging_dir, read back with tensorboard's
own EventAccumulator; refused with a clear message when it cannot be honoured."""
from __future__ import annotations

import importlib.util
import io
import re

import numpy as np
import pytest
from PIL import Image

from lib_lora.cli import _train_config, build_parser, main
from lib_lora.training import tensorboard
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.errors import RequestError
from lib_lora.training.network import NetworkConfig
from lib_lora.training.plan import make_plan
from lib_lora.training.request import build_request
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable, tiny_vae

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed")


@needs_tensorboard
def test_the_event_file_holds_sd_scripts_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_dataset(tmp_path / "data")  # 4 images x 2 repeats: 4 steps of batch 2 per epoch
    images = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    model = trainable(build_sd1(seed=0), tiny_vae())
    model.render = lambda prompts, seed=0: list(images)
    cfg = TrainConfig(DatasetConfig(data, resolution=64, enable_buckets=False), NetworkConfig(rank=4, alpha=4),
                      output_dir=tmp_path / "out", output_name="tb", max_train_steps=6, batch_size=2,
                      learning_rate=1e-3, text_encoder_lr=5e-4, lr_scheduler="linear", lr_warmup_steps=2,
                      sample_prompts=["a", "b"], sample_every_n_steps=3, save_precision="fp32",
                      log_with="tensorboard", logging_dir=tmp_path / "logs", log_prefix="run_")
    res = Trainer(model, make_plan(cfg), Callbacks(log=lambda s: None)).run()
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"run_\d{14}", runs[0].name)
    events = EventAccumulator(str(runs[0] / "network_train"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/current", "loss/average", "lr/unet", "lr/textencoder",
                                             "loss/epoch_average"}

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert [s for s, _ in series("loss/current")] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in series("loss/current")] == pytest.approx(res.losses, rel=1e-6)
    # linear warm-up over 2 steps, then linear decay to 0 at step 6: after step k the rate is lr * f(k)
    f = [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [v for _, v in series("lr/unet")] == pytest.approx([1e-3 * x for x in f], rel=1e-6, abs=1e-12)
    assert [v for _, v in series("lr/textencoder")] == pytest.approx([5e-4 * x for x in f], rel=1e-6, abs=1e-12)
    # one finished epoch (steps 1-4), at x = 1 as sd-scripts plots it
    assert series("loss/epoch_average") == [(1, pytest.approx(sum(res.losses[:4]) / 4, rel=1e-6))]
    assert sorted(events.Tags()["images"]) == ["samples/00", "samples/01"]
    for tag, img in zip(("samples/00", "samples/01"), images):
        logged = events.Images(tag)
        assert [e.step for e in logged] == [3, 6]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(logged[0].encoded_image_string))), np.asarray(img))


@needs_tensorboard
def test_kohyas_logging_flags(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    base = ["train", str(data), "--base", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    for flags in (["--log_with", "tensorboard", "--logging_dir", "L"], ["--log-with", "tensorboard", "--logging-dir", "L"],
                  ["--logging_dir", "L"]):  # a logging folder alone means TensorBoard, as in sd-scripts
        cfg = _train_config(build_parser().parse_args(base + flags))
        assert tensorboard.wanted(cfg) and str(cfg.logging_dir) == "L"
    assert main(base + ["--resolution", "64", "--no-buckets", "--network-dim", "4", "--max-train-steps", "1",
                        "--logging_dir", str(tmp_path / "logs"), "--log_prefix", "p-"]) == 0
    assert "TensorBoard: logging to" in capsys.readouterr().err
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.startswith("p-") and list((run / "network_train").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("extra,message", [
    (["--log_with", "wandb"], "error: --log_with: 'wandb': only tensorboard is supported here"),
    (["--log_with", "all", "--logging_dir", "L"], "error: --log_with: 'all': only tensorboard is supported here"),
    (["--log_with", "tensorboard"], "error: --logging_dir: is required with log_with tensorboard"),
])
def test_logging_that_cannot_be_honoured_is_refused(tiny_checkpoint, tmp_path, capsys, extra, message):
    _, data = tiny_checkpoint
    code = main(["train", str(data), "--base", "never-read", "--out", str(tmp_path / "x.safetensors"), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_without_the_package_tensorboard_is_refused_not_skipped(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    _, data = tiny_checkpoint
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code = main(["train", str(data), "--base", "never-read", "--out", str(tmp_path / "x.safetensors"),
                 "--logging_dir", str(tmp_path / "logs")])
    assert code == 2 and "error: --log_with: TensorBoard logging needs the 'tensorboard' package; install it " \
                          "yourself (pip install tensorboard)" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_a_remote_request_logs_only_inside_the_lora_folder(tmp_path):
    data = make_dataset(tmp_path / "data")
    req = {"output_name": "x", "dataset": {"train_dir": str(data)}, "logging_dir": "../elsewhere"}
    with pytest.raises(RequestError, match="logging_dir: ../elsewhere: must name a folder inside the LoRA folder"):
        build_request(req, tmp_path / "loras", dataset_roots=[tmp_path])
    if HAS_TENSORBOARD:
        cfg = build_request(dict(req, logging_dir="logs"), tmp_path / "loras", dataset_roots=[tmp_path]).config
        assert cfg.logging_dir == str((tmp_path / "loras" / "logs").resolve())


@needs_tensorboard
def test_the_readmes_sample_and_tensorboard_command_line_parses_as_written(tiny_checkpoint, tmp_path):
    import shlex
    from pathlib import Path
    ckpt, data = tiny_checkpoint
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = text.split("Samples and TensorBoard as in sd-scripts", 1)[1].split("```")[1]
    words = shlex.split(block.replace("\\\n", " "))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkx --n blurry\n", encoding="utf-8")
    paths = {"model.safetensors": str(ckpt), "img": str(data), "output": str(tmp_path), "prompts.txt": str(prompts),
             "logs": str(tmp_path / "logs")}
    cfg = _train_config(build_parser().parse_args([paths.get(w, w) for w in words[3:]]))
    assert (cfg.sample_prompts, cfg.sample_every_n_epochs, cfg.sample_sampler, cfg.sample_at_first) == \
        (["zkx --n blurry"], 1, "euler", True)
    assert (cfg.log_with, str(cfg.logging_dir), cfg.log_prefix) == ("tensorboard", str(tmp_path / "logs"), "my_lora-")
