"""The command line never surprises silently (issue 14): progress while the checkpoint loads and the caches
fill, ``render``'s progress and the WebUI's infotext in its PNG, Ctrl-C and SIGTERM saving what was trained."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_lora.cli import main
from lib_lora.fileio import load_file, read_header, save_safetensors
from lib_lora.training.state import read_state_header, state_path

ROOT = Path(__file__).resolve().parent.parent


def _train(ckpt, data, out, *extra):
    return main(["train", str(data), "--base", str(ckpt), "--out", str(out), "--resolution", "64", "--no-buckets",
                 "--network-dim", "4", "--network-alpha", "4", "--learning-rate", "1e-3", "--save-precision", "fp32",
                 "--seed", "3", *extra])


def test_progress_while_loading_and_caching(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert _train(ckpt, data, tmp_path / "p.safetensors", "--max-train-steps", "2", "--unet-only") == 0
    err = capsys.readouterr().err
    for stage in ("reading", "UNet", "text encoder", "VAE"):
        assert f"\rloading toy.safetensors: {stage}..." in err, stage
    assert "loading toy.safetensors: done in" in err
    # four images, cached before the first step; their one caption once (the text encoder is frozen)
    assert "\rcaching latents 4/4" in err and "cached 4 latents in" in err
    assert "\rcaching text encoder outputs 1/1" in err and "cached 1 text encoder outputs in" in err
    assert err.index("cached 4 latents") < err.index("] 1/2 loss")
    # a trained text encoder varies its outputs: nothing of it is cached
    assert _train(ckpt, data, tmp_path / "q.safetensors", "--max-train-steps", "1") == 0
    assert "text encoder outputs" not in capsys.readouterr().err


def test_render_shows_progress_and_writes_the_webuis_infotext(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    lora = tmp_path / "zkx_lora.safetensors"
    assert _train(ckpt, data, lora, "--max-train-steps", "1") == 0
    capsys.readouterr()
    out = tmp_path / "img.png"
    assert main(["render", "zkx, red square <lora:zkx_lora:0.8>", "--base", str(ckpt), "--lora-dir", str(tmp_path),
                 "--out", str(out), "--negative", "blurry, grey", "--steps", "3", "--seed", "5", "--width", "64",
                 "--height", "64", "--n", "2"]) == 0
    err = capsys.readouterr().err
    assert "loading toy.safetensors: done in" in err and "\rrendering 2 images: step 3/3" in err
    data_bytes = lora.read_bytes()
    header = int.from_bytes(data_bytes[:8], "little")
    lora_hash = hashlib.sha256(data_bytes[8 + header:]).hexdigest()[:12]   # the built-in Lora's short hash
    model_hash = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]         # the WebUI's checkpoint short hash
    assert read_header(lora).metadata["sshs_model_hash"].startswith(lora_hash)
    for i, name in enumerate(("img-0.png", "img-1.png")):
        text = Image.open(tmp_path / name).info["parameters"]
        assert text == ("zkx, red square <lora:zkx_lora:0.8>\nNegative prompt: blurry, grey\n"
                        f"Steps: 3, Sampler: DDIM, CFG scale: 7.0, Seed: {5 + i}, Size: 64x64, "
                        f'Model hash: {model_hash}, Model: toy, Lora hashes: "zkx_lora: {lora_hash}"'), text
    # a bundled embedding stands for its name in the prompt, as in the WebUI; one of another width is skipped
    sd, meta = load_file(lora)
    width = load_file(ckpt)[0]["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(1))
    save_safetensors({**sd, "bundle_emb.zkx.string_to_param.*": vec}, tmp_path / "zkx_emb.safetensors", metadata=meta)
    save_safetensors({**sd, "bundle_emb.zkx.string_to_param.*": torch.zeros(1, width + 1)},
                     tmp_path / "zkx_wide.safetensors", metadata=meta)
    images = {}
    for name in ("zkx_lora", "zkx_emb", "zkx_wide"):
        assert main(["render", f"zkx <lora:{name}:1>", "--base", str(ckpt), "--lora-dir", str(tmp_path),
                     "--out", str(tmp_path / f"{name}.png"), "--steps", "2", "--width", "64", "--height", "64"]) == 0
        images[name] = Image.open(tmp_path / f"{name}.png").tobytes()
    err = capsys.readouterr().err
    assert f"warning: zkx_wide: embedding 'zkx' is {width + 1} wide, the loaded model's token embeddings are " \
           f"{width} — skipped" in err and "zkx_emb" not in err
    assert images["zkx_emb"] != images["zkx_lora"] and images["zkx_wide"] == images["zkx_lora"]
    # the WebUI's TI hashes names a bundled embedding the prompt used, by its LoRA's name; none otherwise
    infos = {n: Image.open(tmp_path / f"{n}.png").info["parameters"] for n in images}
    assert 'TI hashes: "zkx: zkx_emb", Lora hashes: "zkx_emb: ' in infos["zkx_emb"], infos["zkx_emb"]
    assert "TI hashes" not in infos["zkx_wide"] and "TI hashes" not in infos["zkx_lora"]
    assert main(["render", "a red square <lora:zkx_emb:1>", "--base", str(ckpt), "--lora-dir", str(tmp_path),
                 "--out", str(tmp_path / "unnamed.png"), "--steps", "1", "--width", "64", "--height", "64"]) == 0
    assert "TI hashes" not in Image.open(tmp_path / "unnamed.png").info["parameters"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_lora_and_its_state_then_exits_non_zero(tiny_checkpoint, tmp_path, sig, code):
    """As the tab's "Stop & save": the weights and the training state at the step reached, then exit 128 + N."""
    ckpt, data = tiny_checkpoint
    out = tmp_path / "sig.safetensors"
    args = ["train", str(data), "--base", str(ckpt), "--out", str(out), "--resolution", "64", "--no-buckets",
            "--network-dim", "4", "--network-alpha", "4", "--save-precision", "fp32", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lib_lora", *args, "--max-train-steps", "100000"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"] 2/100000" not in seen:  # two steps done: the progress bar says so
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=300)
    err = (seen + err).decode()
    assert proc.returncode == code, err[-2000:]
    name = signal.Signals(sig).name
    m = re.search(rf"interrupted by {name} at step (\d+) of 100000: saved (\S+); resume with --resume (\S+)", err)
    assert m, err[-2000:]
    step = int(m.group(1))
    assert step >= 2 and m.group(2) == str(out) and m.group(3) == str(state_path(out))
    assert f"{name}: stopping after this step" in err
    assert read_header(out).metadata["ss_steps"] == str(step)
    assert read_state_header(state_path(out)).step == step
    # and the run goes on from there
    assert main([*args, "--resume", str(state_path(out)), "--max-train-steps", str(step + 1)]) == 0
    assert read_header(out).metadata["ss_steps"] == str(step + 1)


def test_a_stop_before_the_first_step_saves_nothing(tmp_path):
    from lib_lora.training.config import TrainConfig
    from lib_lora.training.dataset import DatasetConfig
    from lib_lora.training.network import NetworkConfig
    from lib_lora.training.plan import make_plan
    from lib_lora.training.trainer import Callbacks, Trainer
    from tiny_models import build_sd1
    from train_support import make_dataset, trainable, tiny_vae

    cfg = TrainConfig(DatasetConfig(make_dataset(tmp_path / "data"), resolution=64, enable_buckets=False),
                      NetworkConfig(rank=4, alpha=4), output_dir=tmp_path / "out", output_name="early",
                      max_train_steps=4)
    lines: list[str] = []
    tr = Trainer(trainable(build_sd1(seed=0), tiny_vae()), make_plan(cfg), Callbacks(log=lines.append))
    tr.request_stop(save=True, state=True)  # e.g. SIGTERM while the checkpoint was loading
    res = tr.run()
    assert (res.steps, res.output, res.stopped) == (0, None, True)
    assert "stopped before the first step: nothing to save" in lines
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_tabs_options_have_flags_and_act(tiny_checkpoint, tmp_path, capsys):
    """Random crop, weight decay, the text-encoder output cache and the bucket step, once tab-only."""
    from lib_lora.cli import _train_config, build_parser
    from lib_lora.training.optim import make_optimizer
    import torch
    ckpt, data = tiny_checkpoint
    base = ["train", str(data), "--base", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    cfg = _train_config(build_parser().parse_args(base + [
        "--random-crop", "--weight-decay", "0.2", "--no-cache-text-encoder-outputs", "--bucket-reso-steps", "32"]))
    assert (cfg.dataset.random_crop, cfg.weight_decay, cfg.cache_text_encoder_outputs,
            cfg.dataset.bucket_reso_steps) == (True, 0.2, False, 32)
    opt, _ = make_optimizer(cfg.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], cfg)
    assert opt.param_groups[0]["weight_decay"] == 0.2
    # with a random crop no latent is cached, and without the text cache a frozen encoder runs every step
    assert _train(ckpt, data, tmp_path / "y.safetensors", "--max-train-steps", "1", "--unet-only",
                  "--random-crop", "--no-cache-text-encoder-outputs") == 0
    assert "caching" not in capsys.readouterr().err


def test_images_smaller_than_the_training_size_are_said_to_be_upscaled(tiny_checkpoint, tmp_path, capsys):
    import numpy as np
    from lib_lora.training.dataset import DatasetConfig
    from lib_lora.training.scan import scan
    folder = tmp_path / "data" / "1_zkx"
    folder.mkdir(parents=True)
    for name, side in (("big.png", 128), ("small.png", 48)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / name)
    code = main(["train", str(tmp_path / "data"), "--base", str(tmp_path / "missing.safetensors"), "--out",
                 str(tmp_path / "x.safetensors"), "--resolution", "64", "--no-buckets"])
    err = capsys.readouterr().err
    assert code == 2  # the checkpoint is read after the dataset's warnings are out
    assert "warning: 1 image(s) are smaller than their training size and will be upscaled, e.g. 'small.png' " \
           "48x48 to 64x64" in err and "turn buckets on with bucket_no_upscale" in err
    # kohya's bucket_no_upscale: buckets never enlarge, each image trains at its own size
    ds = scan(DatasetConfig(tmp_path / "data", resolution=64, bucket_no_upscale=True, bucket_reso_steps=16))
    assert not [p for p in ds.problems if p.kind == "upscaled"]
    assert sorted(i.bucket for i in ds.items) == [(48, 48), (64, 64)]
    up = scan(DatasetConfig(tmp_path / "data", resolution=64, min_bucket_reso=64, max_bucket_reso=128))
    assert [p.path for p in up.problems if p.kind == "upscaled"] == [str(folder / "small.png")]
    assert "or set bucket_no_upscale" in up.summary()["warnings"][0]


def test_ctrl_c_outside_training_exits_130_without_a_traceback(monkeypatch, capsys):
    from lib_lora import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "x.safetensors"]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
