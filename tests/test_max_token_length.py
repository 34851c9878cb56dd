"""kohya's --max_token_length (issue 14) on the command-line host, and its --v2.

The references are built here by hand from sd-scripts v0.10.1's rule (library/strategy_base.py
``_get_input_ids``, strategy_sd.py ``encode_tokens``): the caption cut to N tokens, split into N/75
chunks of 75 words, each chunk ``BOS words EOS`` padded (with EOS for HF CLIP, with 0 after an EOS
for OpenCLIP, where an empty chunk is ``BOS EOS 0 ...``), every chunk encoded on its own, and the
states joined as: the first BOS, each chunk's 75 inner positions, the last chunk's final position.
The word ids come from ``open_clip.tokenize``; the states from the text encoders themselves.
"""
from __future__ import annotations

import re

import pytest
import torch

from lib_lora.cli import main
from lib_lora.fileio import load_safetensors
from lib_lora.hosts.cli.checkpoint import Checkpoint
from lib_lora.hosts.cli.tokenizer import BOS, EOS
from lib_lora.training.checks import model_notes
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.kohya_config import export_files
from lib_lora.training.latents import TextCache
from lib_lora.training.options import OptionError
from lib_lora.training.request import build_request
import tiny_models as tm
from train_support import tiny_vae, trainable

LONG = " ".join(f"word{i} red" for i in range(90))   # no commas: over 225 tokens, no word wrap anywhere
SHORT = "a red square"


def _words(text: str) -> list[int]:
    import open_clip
    row = open_clip.tokenize([text], context_length=2000)[0].tolist()
    return row[1:row.index(EOS)]


def _chunks(text: str, limit: int, pad: int) -> torch.Tensor:
    """[limit // 75, 77]: the caption's chunks as sd-scripts builds them (see the module's docstring)."""
    words = _words(text)[:limit]
    rows = []
    for j in range(limit // 75):
        row = [BOS] + words[75 * j:75 * (j + 1)] + [EOS]  # a chunk cut mid-caption ends in EOS too
        row += [pad] * (77 - len(row))
        rows.append(row)
    return torch.tensor(rows)


def _joined(states: torch.Tensor) -> torch.Tensor:
    """[n, 77, C] -> [75n + 2, C]: BOS, every chunk's 75 inner states, the last chunk's final one."""
    return torch.cat([states[0, :1], states[:, 1:76].flatten(0, 1), states[-1, 76:]])


@pytest.fixture(scope="module")
def ckpts():
    vae = tiny_vae()
    out = {}
    for family, build in (("sd1", tm.build_sd1), ("sd2", tm.build_sd2), ("sdxl", tm.build_sdxl)):
        tiny = build(seed=1)
        out[family] = (tiny, Checkpoint.from_modules(family, tiny.unet, tiny.text_encoders, vae))
    return out


def test_hand_built_chunks_follow_sd_scripts_padding():
    """The reference's own token ids, checked against the rule once, on the cases that differ."""
    words = _words(LONG)
    sd1 = _chunks(LONG, 150, EOS)
    assert sd1[0].tolist() == [BOS] + words[:75] + [EOS] and sd1[1].tolist() == [BOS] + words[75:150] + [EOS]
    short = _chunks(SHORT, 150, 0)                # OpenCLIP: an empty chunk is BOS EOS 0 ...
    n = len(_words(SHORT))
    assert short[0, :n + 2].tolist() == [BOS] + _words(SHORT) + [EOS] and not short[0, n + 2:].any()
    assert short[1, :2].tolist() == [BOS, EOS] and not short[1, 2:].any()


@pytest.mark.parametrize("limit", [75, 150, 225])
def test_sd1_long_and_short_captions_condition_on_kohyas_chunks(ckpts, limit):
    tiny, ck = ckpts["sd1"]
    te = tiny.text_encoders[0][1]
    with torch.no_grad():
        got = ck.encode_text([LONG, SHORT], max_token_length=limit).context
        expected = [_joined(te(input_ids=_chunks(text, limit, EOS)).last_hidden_state) for text in (LONG, SHORT)]
        unlimited = ck.encode_text([LONG]).context
    assert got.shape[1] == limit + 2
    torch.testing.assert_close(got, torch.stack(expected))
    assert unlimited.shape[1] == 77 * -(-len(_words(LONG)) // 75)  # unset: every chunk of the caption, whole


def test_sd2_chunks_pad_with_zero_after_eos(ckpts):
    tiny, ck = ckpts["sd2"]
    te = tiny.text_encoders[0][1]
    with torch.no_grad():
        got = ck.encode_text([LONG, SHORT], max_token_length=225).context
        expected = [_joined(te.ln_final(tm.open_clip_forward(te, _chunks(text, 225, 0))["hidden_states"][-2]))
                    for text in (LONG, SHORT)]
    torch.testing.assert_close(got, torch.stack(expected))


def test_sdxl_joins_both_encoders_and_pools_the_first_chunk(ckpts):
    _, ck = ckpts["sdxl"]
    with torch.no_grad():
        got = ck.encode_text([LONG], max_token_length=150)
        one_chunk = ck.encode_text([LONG], max_token_length=75)
    assert got.context.shape[1] == 152 and one_chunk.context.shape[1] == 77
    torch.testing.assert_close(got.y, one_chunk.y)     # the pooled vector: the first chunk's
    torch.testing.assert_close(got.context[:, :76], one_chunk.context[:, :76])
    assert not torch.allclose(got.context[:, 76:151], one_chunk.context[:, 1:76], atol=1e-3)


def test_max_token_length_values_and_the_host_check(ckpts, tmp_path):
    for bad in (100, 300, 0):
        with pytest.raises(OptionError, match="max_token_length: must be one of 75, 150, 225"):
            TrainConfig(DatasetConfig("x"), max_token_length=bad)
    tiny, _ = ckpts["sd1"]
    with pytest.raises(ValueError, match="max_token_length 150 is asked for"):
        TextCache(trainable(tiny), TrainConfig(DatasetConfig(tmp_path), max_token_length=150))


def test_v2_confirms_sd2_and_is_refused_for_other_families():
    assert model_notes("sd2", "epsilon", True, None) == [
        "v2: the checkpoint is SD2 (detected from its weights; --v2 only confirms it)"]
    assert model_notes("sd2", "v", False, None) == []
    for family, name in (("sd1", "SD1"), ("sdxl", "SDXL")):
        with pytest.raises(OptionError, match=f"v2: says SD2, but the checkpoint is {name}"):
            model_notes(family, "epsilon", True, None)
    (line,) = model_notes("sd2", "epsilon", True, True)[1:]   # honoured as asked, as sd-scripts does, with a line
    assert line.startswith("warning: v_parameterization true: training the SD2 checkpoint to predict v")
    assert model_notes("sd2", "v", True, True) == model_notes("sd2", "v", True, None)


def test_a_request_on_a_loaded_sd2_model_says_v2_whatever_the_form_says(tmp_path):
    """The tab's v2 tick is set when the tab is built: after a switch from SD1 to SD2 it is unticked, and an
    API request need not give it.  On a loaded SD2 model the request says v2 anyway, so an exported config.toml
    loads SD2 in sd-scripts; on SD1 nothing changes."""
    (tmp_path / "data" / "1_x").mkdir(parents=True)
    for given in ({}, {"v2": False}):
        req = {"output_name": "x", "dataset": {"train_dir": str(tmp_path / "data")}, **given}
        cfg = build_request(req, tmp_path, family="sd2").config
        assert cfg.v2 is True
        assert re.search(r"^v2 = true$", export_files(cfg)["config_toml"], re.M)
        cfg = build_request(req, tmp_path, family="sd1").config
        assert cfg.v2 is False and not re.search(r"^v2 = true$", export_files(cfg)["config_toml"], re.M)


def test_the_tabs_v2_follows_the_model_loaded_when_the_request_is_made():
    """The tab's tick was set for another model (a checkpoint switch since): the loaded model decides."""
    from lib_lora.training.ui import form_to_request
    for tick in (True, False):
        assert form_to_request({"v2": tick}, family="sd1")["v2"] is False
        assert form_to_request({"v2": tick}, family="sd2")["v2"] is True
        assert form_to_request({"v2": tick})["v2"] is tick      # no model to say: as ticked (refused then)


def _kohya(ckpt, data, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
            "--output_dir", str(out), "--output_name", "k", "--resolution", "64", "--min_bucket_reso", "64",
            "--max_bucket_reso", "128", "--network_dim", "2", "--network_alpha", "1", "--max_train_steps", "1",
            "--save_precision", "float", *extra]


def test_kohya_command_line_with_max_token_length_and_v2(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert main(_kohya(ckpt, data, tmp_path / "a", "--max_token_length", "150")) == 0
    _, meta = load_safetensors(tmp_path / "a" / "k.safetensors")
    assert meta["ss_max_token_length"] == "150" and meta["ss_v2"] == "False"
    capsys.readouterr()
    with pytest.raises(SystemExit):                    # kohya's choices, checked by the parser
        main(_kohya(ckpt, data, tmp_path / "b", "--max_token_length", "100"))
    assert "invalid choice: 100" in capsys.readouterr().err
    config = tmp_path / "config.toml"
    config.write_text("[model]\nv2 = true\n", encoding="utf-8")
    assert main(_kohya(ckpt, data, tmp_path / "c", "--config_file", str(config))) == 2
    assert "error: --v2: says SD2, but the checkpoint is SD1" in capsys.readouterr().err
    assert not (tmp_path / "c" / "k.safetensors").exists()
