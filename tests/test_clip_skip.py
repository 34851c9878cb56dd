"""kohya's --clip_skip on the command-line host (issue 14): SD1/SD2 conditioning as sd-scripts computes
it, SDXL ignoring it as sd-scripts does, and the samples and metadata of a run trained with it.

The references are computed here from the text encoders themselves (HF ``CLIPTextModel``'s
``hidden_states`` and ``final_layer_norm``, open_clip's blocks and ``ln_final``), following
sd-scripts v0.10.1 (library/strategy_sd.py, train_util.get_hidden_states): the hidden state
``clip_skip`` from the end, then the final layer norm; its SD2 text encoder is OpenCLIP converted
without the last block (model_util: num_hidden_layers=23 of 24).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.hosts.cli.checkpoint import Checkpoint
from lib_lora.hosts.cli.tokenizer import EOS
from lib_lora.training.checks import clip_skip_for
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.latents import TextCache
from lib_lora.training.options import OptionError
import tiny_models as tm
from train_support import tiny_vae, trainable

PROMPTS = ["a photo of a cat", "zkx, red square on grey"]


def _tokens(prompts):
    import open_clip
    oc = open_clip.tokenize(prompts)
    return oc, torch.where(oc == 0, EOS, oc)  # ldm's FrozenCLIPEmbedder pads with EOS


@pytest.fixture(scope="module")
def ckpts():
    vae = tiny_vae()
    out = {}
    for family, build in (("sd1", tm.build_sd1), ("sd2", tm.build_sd2), ("sdxl", tm.build_sdxl)):
        tiny = build(seed=1)
        if family == "sd2":  # three blocks, so that clip skip 2 (one block fewer than the WebUI's 1) exists
            te = tiny.text_encoders[0][1]
            te.transformer.resblocks.append(copy.deepcopy(te.transformer.resblocks[0]))
            torch.nn.init.normal_(te.transformer.resblocks[-1].mlp.c_fc.weight, std=0.2)
        out[family] = (tiny, Checkpoint.from_modules(family, tiny.unet, tiny.text_encoders, vae))
    return out


def test_sd1_clip_skip_2_is_the_penultimate_hidden_state_after_the_final_layer_norm(ckpts):
    tiny, ck = ckpts["sd1"]
    te = tiny.text_encoders[0][1]
    _, ids = _tokens(PROMPTS)
    with torch.no_grad():
        out = te(input_ids=ids, output_hidden_states=True)
        expected = te.text_model.final_layer_norm(out.hidden_states[-2])
        got = ck.trainable(clip_skip=2).encode_text(PROMPTS).context
        last = ck.trainable().encode_text(PROMPTS).context
        one = ck.trainable(clip_skip=1).encode_text(PROMPTS).context
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(last, out.last_hidden_state)  # unset and 1: the last layer, as before
    torch.testing.assert_close(one, out.last_hidden_state)
    assert not torch.allclose(got, last, atol=1e-3)          # the two really differ
    assert ck.trainable(clip_skip=2).clip_skip == 2


def test_sd2_clip_skip_counts_from_sd_scripts_text_encoder_without_the_last_block(ckpts):
    tiny, ck = ckpts["sd2"]
    te = tiny.text_encoders[0][1]
    oc, _ = _tokens(PROMPTS)
    with torch.no_grad():
        hidden = tm.open_clip_forward(te, oc)["hidden_states"]  # embeddings + each of the 3 blocks
        skip1, skip2 = (ck.trainable(clip_skip=n).encode_text(PROMPTS).context for n in (1, 2))
        unset = ck.trainable().encode_text(PROMPTS).context
    torch.testing.assert_close(skip1, te.ln_final(hidden[-2]))  # the WebUI's "penultimate"
    torch.testing.assert_close(unset, skip1)
    torch.testing.assert_close(skip2, te.ln_final(hidden[-3]))
    with pytest.raises(ValueError, match="clip_skip 3: the text encoder has 2 layers"):
        ck.encode_text(PROMPTS, clip_skip=3)


def test_sdxl_ignores_clip_skip_with_a_warning_as_sd_scripts_does(ckpts):
    _, ck = ckpts["sdxl"]
    with torch.no_grad():
        a, b = ck.trainable(clip_skip=2).encode_text(PROMPTS), ck.trainable().encode_text(PROMPTS)
    torch.testing.assert_close(a.context, b.context)
    torch.testing.assert_close(a.y, b.y)
    assert ck.trainable(clip_skip=2).clip_skip is None
    skip, note = clip_skip_for("sdxl", 2)
    assert skip is None and "ignored for SDXL, as sd-scripts ignores it" in note
    assert clip_skip_for("sd1", 2) == (2, None) and clip_skip_for("sdxl", None) == (None, None)


def test_samples_render_at_the_runs_clip_skip(ckpts, monkeypatch):
    from lib_lora.hosts.cli.sampling import sample
    _, ck = ckpts["sd1"]
    seen = []
    encode = ck.encode_text
    monkeypatch.setattr(ck, "encode_text", lambda p, s=None, clip_skip=None: seen.append(clip_skip) or
                        encode(p, s, clip_skip))
    ck.trainable(clip_skip=2).render(["a cat"], steps=1, width=64, height=64)
    sample(ck, "a cat", steps=1, width=64, height=64)
    assert seen == [2, 2, None, None]  # prompt and negative, then a plain render


def test_clip_skip_bounds():
    for n in (1, 2, 12):
        assert TrainConfig(DatasetConfig("x"), clip_skip=n).clip_skip == n
    for bad in (0, 13, 1.5):
        with pytest.raises(OptionError, match="clip_skip: must be a whole number at least 1 and at most 12"):
            TrainConfig(DatasetConfig("x"), clip_skip=bad)


def test_a_host_that_does_not_encode_at_the_runs_clip_skip_is_refused(ckpts, tmp_path):
    tiny, _ = ckpts["sd1"]
    cfg = TrainConfig(DatasetConfig(tmp_path), clip_skip=2)
    with pytest.raises(ValueError, match="clip_skip 2 is asked for, but the host encodes captions at clip skip 1"):
        TextCache(trainable(tiny), cfg)
    TextCache(trainable(tiny), TrainConfig(DatasetConfig(tmp_path), clip_skip=1))  # 1 is the last layer
    sdxl = trainable(ckpts["sdxl"][0])
    TextCache(sdxl, TrainConfig(DatasetConfig(tmp_path), clip_skip=2))  # ignored for SDXL


def test_a_kohya_anime_command_line_trains_unchanged(tiny_checkpoint, tmp_path, capsys):
    """--clip_skip 2 with kohya's speed switches: trained at clip skip 2, the switches answered, the
    metadata as sd-scripts writes it (ss_clip_skip, modelspec.encoder_layer) and the samples at clip skip 2."""
    from PIL import Image

    from lib_lora.cli import main
    from lib_lora.fileio import load_safetensors
    ckpt, data = tiny_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkx, red square --w 64 --h 64 --s 1 --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
                 "--output_dir", str(out), "--output_name", "anime", "--resolution", "64", "--min_bucket_reso", "64",
                 "--max_bucket_reso", "128", "--network_dim", "2",
                 "--network_alpha", "1", "--max_train_steps", "1", "--save_precision", "float", "--clip_skip", "2",
                 "--xformers", "--max_data_loader_n_workers", "8", "--persistent_data_loader_workers",
                 "--sample_prompts", str(prompts), "--sample_at_first", "--sample_sampler", "euler"]) == 0
    logged = "".join(capsys.readouterr())
    assert "note: xformers: attention already runs fused here" in logged
    assert "note: max_data_loader_n_workers 8: no data-loader worker processes" in logged
    _, meta = load_safetensors(out / "anime.safetensors")
    assert (meta["ss_clip_skip"], meta["modelspec.encoder_layer"]) == ("2", "2")
    (png,) = (out / "sample").glob("*.png")
    assert "Clip skip: 2" in Image.open(png).info["parameters"]
