"""Sample prompts as kohya's sd-scripts takes them (issue 14): the line syntax, prompt files, when samples
are due, sd-scripts' file names, and the command line rendering them with the LoRA being trained."""
from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from lib_lora.cli import main
from lib_lora.training import sample_prompts as sp
from lib_lora.training.options import OptionError


def test_a_line_with_every_kohya_option():
    p = sp.parse("a cat, photo --n blurry, ugly --w 768 --h 512 --s 28 --l 5.5 --d 9 --ss euler_a", 64, 64, 1)
    assert p == sp.SamplePrompt("a cat, photo", "blurry, ugly", 768, 512, 28, 5.5, 9, "euler_a", seed_given=True)


def test_what_a_line_leaves_out_comes_from_the_run():
    assert sp.parse("plain prompt", 640, 512, 3) == \
        sp.SamplePrompt("plain prompt", "", 640, 512, sp.DEFAULT_STEPS, sp.DEFAULT_SCALE, 3, None)


def test_options_as_sd_scripts_reads_them():
    p = sp.parse("x --W 96 --S 5000", 64, 64, 3)
    assert (p.width, p.steps) == (96, 1000)          # keys in any case; steps capped at 1000 as sd-scripts does
    assert sp.parse("x --s 0", 64, 64, 3).steps == 1
    p = sp.parse("x --w wide --d 5 --cn img.png --l 4", 64, 64, 3)
    assert (p.prompt, p.width, p.seed, p.scale, p.seed_given) == ("x", 64, 5, 4.0, True)  # bad, unknown: skipped


def test_prompt_files_in_kohyas_three_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\nzkx, red --n blurry --s 3\n  zkx two  \n", encoding="utf-8")
    assert sp.read_file(txt) == ["zkx, red --n blurry --s 3", "zkx two"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["plain", {"prompt": "cat", "negative_prompt": "dog", "width": 96, "sample_steps": 4,
                                        "scale": 5, "seed": 2, "sample_sampler": "euler"}]), encoding="utf-8")
    lines = sp.read_file(js)
    assert lines[0] == "plain"
    assert sp.parse(lines[1], 64, 64, 0) == sp.SamplePrompt("cat", "dog", 96, 64, 4, 5.0, 2, "euler", True)
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 128\nsample_steps = 6\n\n[[prompt.subset]]\nprompt = "a"\n\n'
                    '[[prompt.subset]]\nprompt = "b"\nwidth = 64\n', encoding="utf-8")
    a, b = (sp.parse(line, 32, 32, 0) for line in sp.read_file(toml))
    assert (a.prompt, a.width, a.steps, b.prompt, b.width, b.steps) == ("a", 128, 6, "b", 64, 6)
    with pytest.raises(OptionError, match="file not found"):
        sp.read_file(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(OptionError, match="bad.json"):
        sp.read_file(tmp_path / "bad.json")


class _Cfg:
    def __init__(self, **kw):
        self.sample_prompts, self.sample_at_first, self.gradient_accumulation_steps = ["p"], False, 1
        self.sample_every_n_steps = self.sample_every_n_epochs = 0
        self.__dict__.update(kw)


def test_when_samples_are_due():
    # 10 batches per epoch, accumulated in 4s: 3 optimiser steps per epoch
    every_2_steps = _Cfg(sample_every_n_steps=2, gradient_accumulation_steps=4)
    assert [s for s in range(1, 10) if sp.due(every_2_steps, s, 10)[0]] == [2, 4, 6, 8]
    assert sp.due(every_2_steps, 4, 10) == (True, None)
    # every 2 epochs replaces every N steps
    epochs = _Cfg(sample_every_n_steps=1, sample_every_n_epochs=2, gradient_accumulation_steps=4)
    assert [(s, sp.due(epochs, s, 10)[1]) for s in range(1, 13) if sp.due(epochs, s, 10)[0]] == [(6, 2), (12, 4)]
    assert sp.due(_Cfg(sample_every_n_steps=1), 0, 10) == (False, 0)
    assert sp.due(_Cfg(sample_at_first=True), 0, 10) == (True, 0)       # named as epoch 0, as sd-scripts names it
    assert sp.due(_Cfg(sample_every_n_steps=1, sample_prompts=[]), 1, 10)[0] is False


def test_file_names_are_sd_scripts_names():
    when = time.mktime((2024, 5, 1, 12, 30, 0, 0, 0, -1))
    assert sp.image_name("my_lora", 0, 120, None, 7, when) == "my_lora_000120_00_20240501123000_7.png"
    assert sp.image_name("my_lora", 3, 120, 4, None, when) == "my_lora_e000004_03_20240501123000.png"


# -- the command line ----------------------------------------------------------------------------------------


def _train(ckpt, data, out, *extra):
    return main(["train", str(data), "--base", str(ckpt), "--output_dir", str(out), "--output_name", "s",
                 "--resolution", "64", "--no-buckets", "--network-dim", "4", "--network-alpha", "4",
                 "--learning-rate", "2e-2", "--save-precision", "fp32", "--seed", "3", *extra])


def test_the_cli_renders_kohyas_prompt_file_with_the_lora_in_training(tiny_checkpoint, tmp_path, capsys):
    from lib_lora.hosts.cli.attention import sdpa_attention
    from lib_lora.hosts.cli.checkpoint import load_checkpoint
    from lib_lora.hosts.cli.sampling import sample
    ckpt, data = tiny_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's format\nzkx, red square --n blurry --s 3 --d 7\nzkx --s 2 --ss k_euler\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    assert _train(ckpt, data, out, "--max-train-steps", "4", "--sample_prompts", str(prompts),
                  "--sample_every_n_steps", "2", "--sample_at_first") == 0
    names = sorted(p.name for p in (out / "sample").iterdir())
    stamp = r"_\d{14}"
    expected = [rf"s_000002_00{stamp}_7\.png", rf"s_000002_01{stamp}\.png", rf"s_000004_00{stamp}_7\.png",
                rf"s_000004_01{stamp}\.png", rf"s_e000000_00{stamp}_7\.png", rf"s_e000000_01{stamp}\.png"]
    assert len(names) == 6 and all(re.fullmatch(e, n) for e, n in zip(expected, names)), names
    short = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    first = Image.open(next((out / "sample").glob("s_e000000_00_*")))
    assert first.info["parameters"] == ("zkx, red square\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, "
                                        f"CFG scale: 7.0, Seed: 7, Size: 64x64, Model hash: {short}, Model: toy")
    second = Image.open(next((out / "sample").glob("s_000004_01_*")))
    assert second.info["parameters"] == ("zkx\nSteps: 2, Sampler: Euler, CFG scale: 7.0, Seed: 3, Size: 64x64, "
                                         f"Model hash: {short}, Model: toy")
    # before the first step the LoRA is a no-op: the base model's own render; after training it is not
    ck = load_checkpoint(ckpt)
    with sdpa_attention(ck.unet):
        base = np.asarray(sample(ck, "zkx, red square", negative="blurry", steps=3, cfg=7.0, seed=7,
                                 width=64, height=64, sampler="ddim")[0], dtype=np.float32)
    trained = np.asarray(Image.open(next((out / "sample").glob("s_000004_00_*"))), dtype=np.float32)
    at_first = np.abs(np.asarray(first, dtype=np.float32) - base).max()
    assert "step 4: 2 sample image(s)" in capsys.readouterr().err
    with capsys.disabled():
        print("largest pixel difference from the base render: at first", at_first, "after 4 steps",
              np.abs(trained - base).max())
    assert at_first <= 1 and np.abs(trained - base).max() > 8


@pytest.mark.parametrize("extra,prompt", [(["--sample_sampler", "euler_a"], "x"), ([], "x --ss dpm_2")])
def test_a_sampler_the_cli_cannot_render_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, extra,
                                                                                  prompt, tiny_checkpoint):
    _, data = tiny_checkpoint
    prompts = tmp_path / "p.txt"
    prompts.write_text(prompt, encoding="utf-8")
    code = main(["train", str(data), "--base", "never-read.safetensors", "--out", str(tmp_path / "x.safetensors"),
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "error: --sample-sampler:" in err and "renders samples with ddim, euler, k_euler" in err


def test_sample_settings_that_do_nothing_are_said(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    prompts = tmp_path / "p.txt"
    prompts.write_text("zkx", encoding="utf-8")
    assert _train(ckpt, data, tmp_path / "a", "--max-train-steps", "1", "--sample_prompts", str(prompts)) == 0
    assert "no samples will be rendered" in capsys.readouterr().err
    assert not (tmp_path / "a" / "sample").exists()
