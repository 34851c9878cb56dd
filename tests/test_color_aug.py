"""kohya's color_aug: the hue rotation and gamma against hand-computed values (and the standard library's
colorsys), the draws against sd-scripts' published rates, and the dataset/trainer wiring."""
from __future__ import annotations

import colorsys
import random

import pytest
import torch
from PIL import Image

from lib_lora.training import color_aug
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.latents import LatentCache
from lib_lora.training.plan import make_plan
from lib_lora.training.scan import scan
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable


def _px(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)


@pytest.mark.parametrize("rgb, degrees, want", [
    # pure red turned 16 degrees: hue 16 lies in [0, 60), so R stays the largest, B the smallest, and
    # G = smallest + chroma * 16/60
    ((1.0, 0.0, 0.0), 16.0, (1.0, 16 / 60, 0.0)),
    # hue of (0.8, 0.4, 0.2) is 60 * (0.4 - 0.2) / 0.6 = 20; turned -16 it is 4: G = 0.2 + 0.6 * 4/60
    ((0.8, 0.4, 0.2), -16.0, (0.8, 0.24, 0.2)),
    # hue of (0.8, 0.2, 0.24) is 360 - 60 * 0.04 / 0.6 = 356; turned +16 it wraps to 12: G = 0.2 + 0.6 * 12/60
    ((0.8, 0.2, 0.24), 16.0, (0.8, 0.32, 0.2)),
    # a third of the circle moves red to green
    ((0.9, 0.1, 0.1), 120.0, (0.1, 0.9, 0.1)),
    # grey has no hue: unchanged
    ((0.5, 0.5, 0.5), 13.0, (0.5, 0.5, 0.5)),
])
def test_hue_rotation_by_hand(rgb, degrees, want):
    got = color_aug.rotate_hue(_px(*rgb), degrees).flatten().tolist()
    assert got == pytest.approx(want, abs=1e-6)


def test_hue_rotation_matches_colorsys():
    """On random pixels, against the standard library's HSV round trip with the hue turned."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 8, 8, generator=g)
    for degrees in (-16.0, -3.5, 7.25, 16.0):
        got = color_aug.rotate_hue(rgb, degrees)
        for y in range(8):
            for x in range(8):
                h, s, v = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
                want = colorsys.hsv_to_rgb((h + degrees / 360) % 1.0, s, v)
                assert got[:, y, x].tolist() == pytest.approx(want, abs=1e-5)


def test_apply_works_in_the_vae_range():
    """[-1, 1] pixels: the hue turned in [0, 1] and mapped back; gamma as sd-scripts' power of 0-255 values."""
    red = _px(1.0, -1.0, -1.0)       # (1, 0, 0) in [0, 1]
    out = color_aug.apply(red, ("hue", 16.0)).flatten().tolist()
    assert out == pytest.approx([1.0, 2 * 16 / 60 - 1, -1.0], abs=1e-6)
    # 100 and 250 of 255, raised to 1.05: 100^1.05 = 125.89..., 250^1.05 = 329.1... clipped to 255
    px = _px(2 * 100 / 255 - 1, 2 * 250 / 255 - 1, -1.0)
    out = color_aug.apply(px, ("gamma", 1.05)).flatten().tolist()
    assert out == pytest.approx([2 * 100 ** 1.05 / 255 - 1, 1.0, -1.0], abs=1e-5)
    assert color_aug.apply(px, None) is px


def test_draws_follow_sd_scripts_rates():
    """One image in three changed (0.33), half of those by hue within +-16 degrees, half by gamma in
    [0.95, 1.05], each uniform."""
    rng = random.Random(5)
    draws = [color_aug.draw(rng) for _ in range(60_000)]
    changed = [d for d in draws if d is not None]
    hues = [a for k, a in changed if k == "hue"]
    gammas = [a for k, a in changed if k == "gamma"]
    assert len(changed) / len(draws) == pytest.approx(0.33, abs=0.01)
    assert len(hues) / len(changed) == pytest.approx(0.5, abs=0.02)
    assert min(hues) >= -16 and max(hues) <= 16 and min(hues) < -15.9 and max(hues) > 15.9
    assert sum(hues) / len(hues) == pytest.approx(0.0, abs=0.3)
    assert min(gammas) >= 0.95 and max(gammas) <= 1.05 and sum(gammas) / len(gammas) == pytest.approx(1.0, abs=0.002)


def _train(tmp_path):
    root = tmp_path / "train" / "10_robot"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (200, 40 + 30 * i, 30)).save(root / f"{i}.png")
    return tmp_path / "train"


def test_dataset_draws_the_change_from_the_slots_own_rng(tmp_path):
    """Same seed, epoch, batch and slot: the same change (a resume sees it again); flips and crops are drawn
    as without color_aug; the pixels are the plain ones with the change made."""
    train = _train(tmp_path)
    kw = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, flip_aug=True, random_crop=True)
    plain, aug = scan(DatasetConfig(train, **kw)), scan(DatasetConfig(train, color_aug=True, **kw))
    changes = []
    for b_plain, b_aug, b_again in zip(plain.iterate(1, seed=3, epochs=40), aug.iterate(1, seed=3, epochs=40),
                                       aug.iterate(1, seed=3, epochs=40)):
        p, a, again = plain.sample(b_plain, 0), aug.sample(b_aug, 0), aug.sample(b_again, 0)
        assert (p.flip, p.window, p.color) == (a.flip, a.window, None)
        assert a == again
        changes.append(a.color)
        if a.color is not None:
            assert torch.allclose(aug.pixels(a), color_aug.apply(plain.pixels(p), a.color), atol=1e-6)
    kinds = {c[0] for c in changes if c is not None}
    assert kinds == {"hue", "gamma"} and changes.count(None) > len(changes) // 3


def test_latents_are_not_cached_with_color_aug(tmp_path, vae):
    make_dataset(tmp_path / "data")
    model = trainable(build_sd1(seed=0), vae)
    ds = DatasetConfig(tmp_path / "data", resolution=64, enable_buckets=False, color_aug=True)
    cfg = TrainConfig(ds, output_dir=tmp_path / "out", output_name="c", max_train_steps=3, batch_size=2, seed=1)
    plan = make_plan(cfg, log=lambda m: None)
    assert not LatentCache(model, plan.dataset, cfg).caching
    encoded: list[torch.Tensor] = []
    encode = model.encode_images
    model.encode_images = lambda px: (encoded.append(px.clone()), encode(px))[1]
    logged: list[str] = []
    Trainer(model, plan, Callbacks(log=logged.append)).run()
    assert len(encoded) == 6  # each step encodes its 2 images, one at a time: nothing was cached before step 1
    assert any(m.startswith("cache_latents: off for this run") for m in logged)  # said, not silent


def test_a_dataset_toml_subset_turns_it_on_for_its_images_only(tmp_path):
    """kohya's per-subset color_aug (no longer refused), as sd-scripts' ss_datasets records it."""
    from lib_lora.training.kohya_dataset import read_dataset_config
    from lib_lora.training.metadata import option_metadata
    train = _train(tmp_path)
    general, top = read_dataset_config({"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(train / "10_robot"), "color_aug": True}, {"image_dir": str(train / "10_robot")}]}]},
        "d.toml")
    cfg = DatasetConfig(None, **general)
    assert [s.settings.color_aug for s in cfg.subsets()] == [True, False]
    assert option_metadata(TrainConfig(DatasetConfig(train, color_aug=True)))["ss_color_aug"] is True
