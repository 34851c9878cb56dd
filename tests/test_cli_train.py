"""`python -m lib_lora train` on a single-file checkpoint, alone and under `accelerate launch` (2 CPU processes)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora.cli import main
from lib_lora.fileio import load_safetensors

ROOT = Path(__file__).resolve().parent.parent


def args(ckpt, data, out, *extra):
    return ["train", str(data), "--base", str(ckpt), "--out", str(out), "--resolution", "64", "--no-buckets",
            "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--network-dim", "4", "--network-alpha", "4",
            "--learning-rate", "1e-3", "--save-precision", "fp32", "--seed", "3", *extra]


def test_cli_trains_a_loadable_file(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    out = tmp_path / "concept.safetensors"
    assert main(args(ckpt, data, out, "--max-train-steps", "2")) == 0
    sd, meta = load_safetensors(out)
    assert meta["ss_sd_model_name"] == "toy" and meta["ss_steps"] == "2"
    assert meta["ss_new_sd_model_hash"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    assert main(args(ckpt, data, out, "--max-train-steps", "1")) == 2  # never overwrites without --force
    assert "already exists" in capsys.readouterr().err


def test_captions_longer_than_one_chunk_batch_with_short_ones(tiny_checkpoint, tmp_path):
    """A 100-token caption is two 77-token chunks; batched with one-chunk captions from the text
    cache, the short ones are padded with empty chunks (as the WebUI pads a batch of prompts)."""
    import shutil
    ckpt, data = tiny_checkpoint
    mixed = tmp_path / "data"
    shutil.copytree(data, mixed)
    caption = next(mixed.rglob("*.txt"))
    caption.write_text(", ".join(f"tag{i}" for i in range(40)), encoding="utf-8")  # 40 x (tag, N, comma)
    out = tmp_path / "long.safetensors"
    assert main(args(ckpt, mixed, out, "--max-train-steps", "2", "--batch-size", "4", "--unet-only")) == 0
    sd, meta = load_safetensors(out)
    assert meta["ss_steps"] == "2" and all(torch.isfinite(v).all() for v in sd.values())


def test_a_copied_dataset_trains_the_same_file(tiny_checkpoint, tmp_path):
    """The same images in another folder, with the same seed: bit-identical weights.  The checkpoint's VAE
    samples its posterior, and that sample is seeded by each image's place in the dataset, not its path."""
    import shutil
    ckpt, data = tiny_checkpoint
    files = []
    for where in ("a/data", "b/elsewhere/data"):
        shutil.copytree(data, tmp_path / where)
        files.append(tmp_path / f"{len(files)}.safetensors")
        assert main(args(ckpt, tmp_path / where, files[-1], "--max-train-steps", "2", "--unet-only")) == 0
    a, b = (load_safetensors(p)[0] for p in files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_and_multi(ckpt, data, tmp_path, *extra):
    """(one process at batch 2, two processes at batch 1 under ``accelerate launch``): their files."""
    # Both runs are fresh processes with one thread each, so their rounding does not depend on
    # what earlier tests left in this process (thread count, allocator state).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    single = tmp_path / "single.safetensors"
    r = subprocess.run([sys.executable, "-m", "lib_lora", *args(ckpt, data, single, *extra, "--batch-size", "2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    multi = tmp_path / "multi.safetensors"
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's torchrun launcher; with no GPU the processes fall back to gloo on CPU
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "lib_lora", *args(ckpt, data, multi, *extra, "--batch-size", "1")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return single, multi


def test_two_processes_equal_one_with_double_batch(tiny_checkpoint, tmp_path):
    ckpt, data = tiny_checkpoint
    single, multi = _single_and_multi(ckpt, data, tmp_path, "--max-train-steps", "3")
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
    # turns rounding into steps of up to ~lr.
    print("largest weight difference / lr:", max((b[k] - a[k]).abs().max().item() for k in a) / lr)
    for k in a:
        assert (b[k] - a[k]).abs().max().item() < lr, k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k)


def test_two_processes_step_the_pivotal_words_vectors_as_one_does(tiny_checkpoint, tmp_path):
    """Most batches hold no caption with the word: one process then leaves the vectors (and AdamW's moments)
    alone, and so must two, whose gradient sum would otherwise be a zero that AdamW still steps on."""
    import shutil
    ckpt, data = tiny_checkpoint
    mixed = tmp_path / "data"
    shutil.copytree(next(data.iterdir()), mixed / "3_plain")
    for caption in (mixed / "3_plain").glob("*.txt"):
        caption.write_text("red square, grey background", encoding="utf-8")
    (mixed / "1_zkx").mkdir()
    image = next((mixed / "3_plain").glob("*.png"))
    shutil.copy(image, mixed / "1_zkx" / image.name)
    (mixed / "1_zkx" / image.with_suffix(".txt").name).write_text("zkx, red square", encoding="utf-8")
    # 13 samples an epoch, one with the word: 7 steps of 2 see it, and many batches without it after
    single, multi = _single_and_multi(ckpt, mixed, tmp_path, "--max-train-steps", "7", "--unet-only",
                                      "--pivotal-word", "zkx", "--pivotal-lr", "1e-2")
    key = "bundle_emb.zkx.string_to_param.*"
    (a, _), (b, _) = load_safetensors(single), load_safetensors(multi)
    table = load_safetensors(ckpt)[0]["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    start = table[__import__("open_clip").tokenizer._tokenizer.encode("zkx")].float()
    assert (a[key] - start).abs().max() > 0.5e-2                      # the vectors did train
    print("largest vector difference / lr:", (b[key] - a[key]).abs().max().item() / 1e-2)
    assert (b[key] - a[key]).abs().max() < 1e-2 * 0.05


def test_memory_options_reach_the_config(tiny_checkpoint, tmp_path):
    from lib_lora.cli import _train_config, build_parser
    ckpt, data = tiny_checkpoint
    for extra, want in (((), (None, False)),
                        (("--lean-frozen-layers", "off", "--gradient-checkpointing"), (False, True)),
                        (("--lean-frozen-layers", "on"), (True, False))):
        cfg = _train_config(build_parser().parse_args(args(ckpt, data, tmp_path / "o.safetensors", *extra)))
        assert (cfg.lean_frozen_layers, cfg.gradient_checkpointing) == want


# -- kohya's spellings (issue 14) ----------------------------------------------------------------------


def test_a_kohya_command_line_trains_unchanged(tiny_checkpoint, tmp_path):
    """train_network.py's options as its users write them (the README's example, at toy size)."""
    ckpt, data = tiny_checkpoint
    out = tmp_path / "out"
    kohya = ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data), "--output_dir", str(out),
             "--output_name", "k", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
             "--network_args", "conv_dim=2", "conv_alpha=1", "algo=locon", "--resolution", "64,64",
             "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--train_batch_size", "2",
             "--max_train_steps", "2", "--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.05",
             "--learning_rate", "1e-3", "--unet_lr", "1e-3", "--text_encoder_lr", "5e-4", "--lr_scheduler", "constant",
             "--mixed_precision", "no", "--save_precision", "float", "--save_model_as", "safetensors",
             "--save_every_n_steps", "1", "--seed", "3", "--cache_latents", "--prior_loss_weight", "1.0",
             "--clip_skip", "1", "--caption_extension", ".txt"]
    assert main(["train", *kohya]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["k-step00000001.safetensors", "k.safetensors"]
    sd, meta = load_safetensors(out / "k.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_batch_size_per_device"]) == ("4", "2.0", "2")
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2" and meta["ss_clip_skip"] == "1"
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.001", "0.0005")
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.05)"
    assert any("conv_in" not in k and "resnets" in k for k in sd)  # LoCon layers from conv_dim
    # and on from that file: kohya's --network_weights
    again = kohya[:kohya.index("--output_name") + 1] + ["k2"] + kohya[kohya.index("--output_name") + 2:]
    assert main(["train", *again, "--network_weights", str(out / "k.safetensors")]) == 0
    assert (out / "k2.safetensors").is_file()


def _train_parser():
    from lib_lora.cli import build_parser
    import argparse
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_spelling_of_an_option_sets_it(tiny_checkpoint, tmp_path):
    """Each argument's option strings (ours and kohya's, with - and _) reach the same config."""
    from lib_lora.cli import _train_config, build_parser
    from lib_lora.training.cli_args import spellings
    from lib_lora.training.options import OPTIONS
    ckpt, data = tiny_checkpoint
    base = ["train", str(data), "--base", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    parser = build_parser()
    values = {"resolution": "64", "optimizer": "adamw", "lr_scheduler": "cosine", "save_precision": "bf16",
              "mixed_precision": "bf16", "lean_frozen_layers": "off", "clip_skip": "1", "module": "networks.lora",
              "save_model_as": "safetensors", "caption_extension": ".caption", "keep_tokens_separator": "|||",
              "caption_separator": ";", "bucket_reso_steps": "128", "min_bucket_reso": "128",
              "max_bucket_reso": "2048", "sample_sampler": "euler", "max_token_length": "150"}
    needs = {"full_fp16": ["--mixed-precision", "fp16"], "full_bf16": ["--mixed-precision", "bf16"]}
    untested = {"network_weights", "reg_dir", "output_name", "output_dir"}  # paths: the tests above use them
    # these need the tensorboard package and each other: test_training_tensorboard.py spells them
    logging = {"log_with", "logging_dir"}
    untested |= logging
    seen = set()
    for action in _train_parser()._actions:
        o = next((o for o in OPTIONS if o.name == action.dest), None)
        if o is None or not action.option_strings or o.name in untested:
            continue
        value = [] if action.nargs == 0 else [values.get(o.name, "0.25" if action.type is float else "3")]
        configs = []
        for flag in action.option_strings:
            assert set(spellings(flag)) <= set(action.option_strings), flag
            cfg = _train_config(parser.parse_args(base + needs.get(o.name, []) + [flag, *value]))
            configs.append(getattr(getattr(cfg, o.section) if o.section else cfg, o.name))
        assert len(set(map(repr, configs))) == 1, (action.option_strings, configs)
        seen.add(o.key)
    kohya_flags = {o.key for o in OPTIONS if o.kohya and o.kohya_note in ("", "inverted")}
    assert kohya_flags - seen == {"output_name", "output_dir", "dataset.train_dir", "network_weights",
                                  "dataset.reg_dir"} | logging


def test_unknown_options_show_the_train_usage(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    with pytest.raises(SystemExit) as e:
        main(args(ckpt, data, tmp_path / "x.safetensors", "--lowram"))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: python -m lib_lora train ") and "unrecognized arguments: --lowram" in err
    assert "never ignored" in err


@pytest.mark.parametrize("extra,message", [
    (["--network_args", "algo=loha"], "error: --network_args: algo=loha: this trainer trains lora and locon"),
    (["--network_args", "rank_dropout=0.1"], "error: --network_args: rank_dropout is not a network argument"),
    (["--network_args", "conv_dim"], "error: --network_args: expected key=value"),
    (["--optimizer_args", "betas=(0.9"], "error: --optimizer_args: betas=(0.9: not a Python literal"),
    (["--clip_skip", "13"], "error: --clip-skip: must be a whole number at least 1 and at most 12"),
    (["--output_name", "y"], "error: --out: give --out, or kohya's --output_dir and --output_name, not both"),
    (["--network_module", "lycoris.kohya"], "invalid choice: 'lycoris.kohya'"),
])
def test_kohya_values_this_trainer_cannot_honour_are_refused(tiny_checkpoint, tmp_path, capsys, extra, message):
    ckpt, data = tiny_checkpoint
    try:
        code = main(args(ckpt, data, tmp_path / "x.safetensors", *extra))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


def test_help_is_grouped_as_the_tab_with_every_default(capsys):
    from lib_lora.training.options import GROUPS
    parser = _train_parser()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    # the tab's sections in its order
    assert titles == ["options", "Input and output"] + [g for g, _ in GROUPS]
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and any(w in action.help for w in ("default", "required")), action.option_strings
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--network_dim NETWORK_DIM" in text and "LoRA rank (dim) (default: 16)" in text


def test_the_readmes_kohya_command_line_parses_as_written(tiny_checkpoint, tmp_path):
    """The README's sd-scripts command line, with its paths pointed at test files, becomes this config."""
    import shlex
    from lib_lora.cli import _train_config, build_parser
    ckpt, data = tiny_checkpoint
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("A `train_network.py` command line works unchanged", 1)[1].split("```")[1]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "lib_lora"]
    paths = {"model.safetensors": str(ckpt), "img": str(data), "output": str(tmp_path)}
    words = [paths.get(w, w) for w in words[3:]]
    cfg = _train_config(build_parser().parse_args(words))
    assert (cfg.output_name, cfg.network.rank, cfg.network.alpha, cfg.network.conv_rank, cfg.network.conv_alpha) == \
        ("my_lora", 16, 8.0, 8, 4.0)
    assert (cfg.batch_size, cfg.max_train_epochs, cfg.weight_decay, cfg.unet_lr, cfg.text_encoder_lr) == \
        (2, 10, 0.1, 1e-4, 5e-5)
    assert (cfg.dataset.resolution, cfg.dataset.enable_buckets, cfg.save_every_n_epochs, cfg.clip_skip) == \
        ("512,512", True, 2, 1)
