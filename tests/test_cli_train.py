"""`python -m lib_lora train` on a single-file checkpoint, alone and under `accelerate launch` (2 CPU processes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora.cli import main
from lib_lora.fileio import load_safetensors
from lib_lora.hosts.cli.checkpoint import Checkpoint, save_checkpoint
from tiny_models import build_sd1
from train_support import make_dataset, tiny_vae

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny = build_sd1(seed=0)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    ckpt = save_checkpoint(ck, root / "toy.safetensors", dtype=torch.float32)
    return ckpt, make_dataset(root / "data")


def args(ckpt, data, out, *extra):
    return ["train", str(data), "--base", str(ckpt), "--out", str(out), "--resolution", "64", "--no-buckets",
            "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--network-dim", "4", "--network-alpha", "4",
            "--learning-rate", "1e-3", "--save-precision", "fp32", "--seed", "3", *extra]


def test_cli_trains_a_loadable_file(setup, tmp_path, capsys):
    ckpt, data = setup
    out = tmp_path / "concept.safetensors"
    assert main(args(ckpt, data, out, "--max-train-steps", "2")) == 0
    sd, meta = load_safetensors(out)
    assert meta["ss_sd_model_name"] == "toy" and meta["ss_steps"] == "2"
    assert meta["ss_new_sd_model_hash"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    assert main(args(ckpt, data, out, "--max-train-steps", "1")) == 2  # never overwrites without --force
    assert "already exists" in capsys.readouterr().err


def test_captions_longer_than_one_chunk_batch_with_short_ones(setup, tmp_path):
    """A 100-token caption is two 77-token chunks; batched with one-chunk captions from the text
    cache, the short ones are padded with empty chunks (as the WebUI pads a batch of prompts)."""
    import shutil
    ckpt, data = setup
    mixed = tmp_path / "data"
    shutil.copytree(data, mixed)
    caption = next(mixed.rglob("*.txt"))
    caption.write_text(", ".join(f"tag{i}" for i in range(40)), encoding="utf-8")  # 40 x (tag, N, comma)
    out = tmp_path / "long.safetensors"
    assert main(args(ckpt, mixed, out, "--max-train-steps", "2", "--batch-size", "4", "--unet-only")) == 0
    sd, meta = load_safetensors(out)
    assert meta["ss_steps"] == "2" and all(torch.isfinite(v).all() for v in sd.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_double_batch(setup, tmp_path):
    ckpt, data = setup
    single = tmp_path / "single.safetensors"
    assert main(args(ckpt, data, single, "--max-train-steps", "3", "--batch-size", "2")) == 0
    multi = tmp_path / "multi.safetensors"
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's torchrun launcher; with no GPU the processes fall back to gloo on CPU
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "lib_lora", *args(ckpt, data, multi, "--max-train-steps", "3", "--batch-size", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, meta_a = load_safetensors(single)
    b, meta_b = load_safetensors(multi)
    assert meta_b["ss_total_batch_size"] == meta_a["ss_total_batch_size"] == "2"
    assert a.keys() == b.keys()
    # Summing gradients across processes differs from one process only by float rounding. Adam
    # normalises each gradient, so layers whose true gradient is ~0 (self-attention over the single
    # token of the 1x1 mid block) turn that rounding into visible noise; judge the network as a whole.
    va = torch.cat([a[k].flatten() for k in sorted(a)])
    vb = torch.cat([b[k].flatten() for k in sorted(a)])
    rel = ((vb - va).norm() / va.norm()).item()
    print("relative difference of the whole network:", rel)
    assert rel < 1e-4
    lr = 1e-3
    # No weight ends more than one Adam step (~lr) apart.  Where a weight's gradient is ~0, Adam
    # turns rounding into steps of up to ~lr, and the rounding of the in-process run depends on
    # what earlier tests left behind (0.32 lr seen once in the full suite; the test alone passes
    # the old bound of 0.25 lr).
    for k in a:
        assert (b[k] - a[k]).abs().max().item() < lr, k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k)


def test_memory_options_reach_the_config(setup, tmp_path):
    from lib_lora.cli import _train_config, build_parser
    ckpt, data = setup
    for extra, want in (((), (None, False)),
                        (("--lean-frozen-layers", "off", "--gradient-checkpointing"), (False, True)),
                        (("--lean-frozen-layers", "on"), (True, False))):
        cfg = _train_config(build_parser().parse_args(args(ckpt, data, tmp_path / "o.safetensors", *extra)))
        assert (cfg.lean_frozen_layers, cfg.gradient_checkpointing) == want
