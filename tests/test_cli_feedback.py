"""The command line never surprises silently (issue 14): progress while the checkpoint loads and the caches
fill, ``render``'s progress and the WebUI's infotext in its PNG."""
from __future__ import annotations

import hashlib

from PIL import Image

from lib_lora.cli import main
from lib_lora.fileio import read_header


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
