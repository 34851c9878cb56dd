"""Dataset side of LoRA training: kohya folder conventions, buckets, captions, epoch order."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_lora.training.buckets import Bucketer, BucketTooSmall, make_buckets, parse_resolution
from lib_lora.training.captions import process_caption
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.epochs import Position
from lib_lora.training.problems import DatasetError
from lib_lora.training.scan import balance_reg, scan, validate


def img(path: Path, size=(64, 96), color=(200, 30, 30), fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt, **save)
    return path


def text(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def small(train, **kw) -> DatasetConfig:
    """A config sized for tiny test images (buckets 64..256 around 128)."""
    return DatasetConfig(train, **{"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, **kw})


@pytest.fixture
def train(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    img(root / "20_robot" / "a.png", (64, 64))
    text(root / "20_robot" / "a.txt", "robot, red, standing")
    img(root / "20_robot" / "b.JPG", (64, 96), fmt="JPEG")          # no caption -> trigger words
    img(root / "20_robot" / "c.webp", (96, 64), fmt="WEBP")
    text(root / "20_robot" / "c.caption", "robot, sitting")
    img(root / "10_sks dog" / "d.jpeg", (64, 64), fmt="JPEG")
    img(root / "10_sks dog" / "e.bmp", (64, 64), fmt="BMP")
    text(root / "10_sks dog" / "notes.md", "not data")
    text(root / "10_sks dog" / "d.npz", b"\x00latents")
    img(root / ".cache" / "x.png")                                  # hidden: ignored
    (root / "logs").mkdir()                                         # no images, no prefix: ignored
    return root


# --- folder conventions ---------------------------------------------------------------------------
def test_folder_conventions_and_captions(train):
    ds = scan(small(train))
    by_name = {i.path.name: i for i in ds.items}
    assert sorted(by_name) == ["a.png", "b.JPG", "c.webp", "d.jpeg", "e.bmp"]
    assert by_name["a.png"].caption == "robot, red, standing" and by_name["a.png"].caption_source == "file"
    assert by_name["b.JPG"].caption == "robot" and by_name["b.JPG"].caption_source == "folder"
    assert by_name["c.webp"].caption == "robot, sitting"                  # .caption accepted too
    assert by_name["d.jpeg"].caption == "sks dog" and by_name["d.jpeg"].repeats == 10
    assert by_name["b.JPG"].size == (64, 96) and by_name["b.JPG"].folder == "20_robot"
    assert not any(i.is_reg for i in ds.items)
    s = ds.summary(batch_size=2)
    assert s["ok"] and s["train_images"] == 5 and s["train_images_x_repeats"] == 3 * 20 + 2 * 10
    folders = {f["name"]: (f["images"], f["repeats"]) for f in s["folders"]}
    assert folders == {"20_robot": (3, 20), "10_sks dog": (2, 10)}
    assert sorted(Path(p).name for p in s["images_without_captions"]) == ["b.JPG", "d.jpeg", "e.bmp"]
    assert s["steps_per_epoch"] == sum((b["samples"] + 1) // 2 for b in s["buckets"])
    json.dumps(s)  # the UI/API gets it as JSON


def test_caption_extension_option_wins(tmp_path):
    root = tmp_path / "t"
    img(root / "1_cat" / "a.png")
    text(root / "1_cat" / "a.txt", "from txt")
    text(root / "1_cat" / "a.caption", "from caption")
    assert scan(small(root)).items[0].caption == "from txt"
    assert scan(small(root, caption_extension="caption")).items[0].caption == "from caption"


def test_caption_first_nonblank_line_and_bom(tmp_path):
    root = tmp_path / "t"
    img(root / "1_cat" / "a.png")
    text(root / "1_cat" / "a.txt", b"\xef\xbb\xbf\n  cat, sofa  \nsecond line\n")
    assert scan(small(root)).items[0].caption == "cat, sofa"


def test_exif_orientation_swaps_size(tmp_path):
    root = tmp_path / "t"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored 96x64, shown 64x96
    img(root / "1_cat" / "a.jpg", (96, 64), fmt="JPEG", exif=exif)
    ds = scan(small(root))
    item = ds.items[0]
    assert item.size == (64, 96) and item.orientation == 6
    assert ds.load_image(item).shape == (3, item.bucket[1], item.bucket[0])


# --- errors ---------------------------------------------------------------------------------------
def test_empty_dataset(tmp_path):
    (tmp_path / "t" / "10_robot").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images found"):
        scan(small(tmp_path / "t"))
    with pytest.raises(DatasetError, match="does not exist"):
        scan(small(tmp_path / "missing"))


def test_folder_without_prefix(tmp_path):
    img(tmp_path / "t" / "robot" / "a.png")
    with pytest.raises(DatasetError) as e:
        scan(small(tmp_path / "t"))
    assert str(e.value) == "folder 'robot' has no '<repeats>_' prefix, e.g. '10_robot'"
    img(tmp_path / "u" / "0_robot" / "a.png")
    with pytest.raises(DatasetError, match="0 repeats"):
        scan(small(tmp_path / "u"))


def test_corrupt_image_strict_and_collected(train):
    bad = text(train / "20_robot" / "broken.png", b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png") as e:
        scan(small(train))
    assert e.value.kind == "unreadable" and e.value.path == str(bad)
    ds = scan(small(train), strict=False)  # the other images still load
    assert len(ds) == 5 and ds.summary()["unreadable"] == [str(bad)] and not ds.summary()["ok"]


def test_truncated_image_fails_at_load_naming_file(tmp_path):
    root = tmp_path / "t"
    p = img(root / "1_cat" / "a.png", (64, 64))
    Image.effect_noise((64, 64), 50).convert("RGB").save(p)  # noise: data large enough to truncate
    p.write_bytes(p.read_bytes()[:200])  # header intact, pixel data cut
    ds = scan(small(root))  # only headers are read while scanning
    with pytest.raises(DatasetError, match="a.png"):
        ds.load_image(ds.items[0])


def test_non_utf8_caption(train):
    text(train / "20_robot" / "a.txt", b"robot, \xff\xfe tag")
    with pytest.raises(DatasetError, match=r"a\.txt.*not valid UTF-8.*byte position 7"):
        scan(small(train))


def test_empty_caption_falls_back_with_warning(train):
    text(train / "20_robot" / "a.txt", "  \n\n")
    ds = scan(small(train))
    a = next(i for i in ds.items if i.path.name == "a.png")
    assert a.caption == "robot" and a.caption_source == "empty"
    s = ds.summary()
    assert s["ok"] and s["empty_captions"] == [str(train / "20_robot" / "a.txt")]
    assert any("caption file is empty" in w for w in s["warnings"])


def test_huge_image_by_max_pixels_and_pil_limit(train, monkeypatch):
    with pytest.raises(DatasetError, match=r"b\.JPG.*max_pixels") as e:
        scan(small(train, max_pixels=64 * 64 * 1.4))  # 64x96 and 96x64 exceed it
    assert e.value.kind == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x limit -> PIL would raise a bomb error
    with pytest.raises(DatasetError, match=r"d\.jpeg.*decompression-bomb"):
        scan(small(train))


def test_validate_collects_everything(train):
    img(train / "robot2" / "z.png")
    text(train / "20_robot" / "broken.png", b"garbage")
    text(train / "20_robot" / "a.txt", b"\xc3\x28")
    img(train / "stray.png")
    summary, problems = validate(small(train), batch_size=4)
    kinds = Counter(p.kind for p in problems)
    assert kinds["no_prefix"] == 1 and kinds["unreadable"] == 1 and kinds["encoding"] == 1
    assert kinds["stray_images"] == 1
    assert not summary["ok"] and summary["train_images"] == 4 and len(summary["errors"]) == 3
    summary, problems = validate(small(train, resolution=500))
    assert problems[0].kind == "config" and "multiple of 64" in problems[0].message
    assert not summary["ok"] and summary["train_images"] == 0 and summary["steps_per_epoch"] == 0
    summary, problems = validate(small(train, resolution="big"))
    assert "not a number" in problems[0].message and summary["resolution"] is None


def test_config_checks(tmp_path):
    assert small(tmp_path, resolution="512,768").reso == (512, 768)
    assert parse_resolution((640, 384)) == (640, 384)
    for bad in ({"resolution": 500}, {"min_bucket_reso": 320, "resolution": 256}, {"caption_dropout_rate": 2},
                {"bucket_reso_steps": 12}):
        with pytest.raises(DatasetError):
            scan(DatasetConfig(tmp_path, **bad))


# --- buckets --------------------------------------------------------------------------------------
def test_bucket_set_by_hand():
    # area 512² = 262144: for each width w (256..1024 step 64), h = floor(262144 / w / 64) * 64, capped at 1024.
    expected = {(512, 512), (256, 1024), (320, 768), (384, 640), (448, 576), (320, 704), (256, 832),
                (256, 896), (256, 960)}
    expected |= {(h, w) for w, h in expected}
    assert set(make_buckets((512, 512), 256, 1024, 64)) == expected and len(expected) == 17


def test_bucket_assignment():
    b = Bucketer((512, 512))
    # 512x768 (ratio 0.667): 384x640 (0.600) is closer than 448x576 (0.778).  448x640 would exceed the 512²
    # area.  The image is wider than 0.6, so heights match: 768 -> 640, 512 -> 427, and 43 px of width are cropped.
    a = b.assign(512, 768)
    assert a.bucket == (384, 640) and a.resized == (427, 640)
    assert b.assign(768, 512).bucket == (640, 384)
    assert b.assign(1000, 1000).bucket == (512, 512) and b.assign(1000, 1000).resized == (512, 512)
    assert b.assign(100, 100).resized == (512, 512)  # upscaled without no_upscale
    assert b.assign(448, 576).bucket == (448, 576) and b.assign(448, 576).resized == (448, 576)
    assert b.assign(2000, 250).bucket == (1024, 256)  # extreme ratio: the widest bucket


def test_bucket_no_upscale():
    b = Bucketer((512, 512), no_upscale=True)
    a = b.assign(300, 200)  # within the area budget: own size rounded down, no resampling
    assert a.bucket == (256, 192) and a.resized == (300, 200)
    a = b.assign(2000, 1000)  # too big: shrink to area 512², keep ratio 2 -> 640x320
    assert a.bucket == (640, 320) and a.resized == (640, 320)
    for w, h in [(65, 700), (999, 333), (513, 511), (4000, 3000), (64, 64)]:
        a = b.assign(w, h)
        assert a.bucket[0] <= a.resized[0] <= w and a.bucket[1] <= a.resized[1] <= h  # never upscaled
        assert a.bucket[0] % 64 == 0 and a.bucket[1] % 64 == 0 and a.bucket[0] * a.bucket[1] <= 512 * 512
    with pytest.raises(BucketTooSmall):
        b.assign(40, 40)


def test_no_upscale_too_small_image_named(tmp_path):
    img(tmp_path / "t" / "1_cat" / "tiny.png", (40, 40))
    with pytest.raises(DatasetError, match="tiny.png.*bucket_reso_steps"):
        scan(small(tmp_path / "t", bucket_no_upscale=True))


def test_buckets_disabled_uses_resolution(train):
    ds = scan(small(train, enable_buckets=False, resolution=(128, 64)))
    assert {i.bucket for i in ds.items} == {(128, 64)}
    assert ds.load_image(ds.items[0]).shape == (3, 64, 128)


# --- images ---------------------------------------------------------------------------------------
def test_load_image_range_crop_flip(tmp_path):
    root = tmp_path / "t"
    p = root / "1_cat" / "half.png"
    p.parent.mkdir(parents=True)
    im = Image.new("RGB", (128, 128), (0, 0, 0))
    im.paste((255, 255, 255), (64, 0, 128, 128))  # left black, right white
    im.save(p)
    ds = scan(small(root))
    item = ds.items[0]
    assert item.bucket == (128, 128)
    x = ds.load_image(item)
    assert x.dtype == torch.float32 and x.shape == (3, 128, 128)
    assert x.min() == -1 and x.max() == 1 and x[:, :, 0].mean() == -1 and x[:, :, -1].mean() == 1
    assert torch.equal(ds.load_image(item, flip=True), x.flip(-1))
    # a forced wider bucket: centre crop of the 128x128 -> 128x64 window keeps both halves
    y = ds.load_image(item, bucket=(128, 64))
    assert y.shape == (3, 64, 128) and y[:, :, 0].mean() == -1


def test_random_crop_deterministic(tmp_path):
    root = tmp_path / "t"
    Image.effect_noise((200, 64), 60).convert("RGB").save(img(root / "1_cat" / "n.png", (200, 64)))
    ds = scan(small(root, random_crop=True))
    item = ds.items[0]
    crops = [ds.load_image(item, rng=random.Random(s)) for s in range(4)]
    assert torch.equal(crops[0], ds.load_image(item, rng=random.Random(0)))
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    assert torch.equal(ds.load_image(item), ds.load_image(item))  # no rng: centre crop


def test_transparency_on_white(tmp_path):
    root = tmp_path / "t"
    p = root / "1_cat" / "a.png"
    p.parent.mkdir(parents=True)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(p)
    ds = scan(small(root))
    assert ds.load_image(ds.items[0]).min() == 1


# --- captions -------------------------------------------------------------------------------------
def test_keep_tokens_shuffle(tmp_path):
    cfg = DatasetConfig(tmp_path, shuffle_caption=True, keep_tokens=2)
    cap = "sks dog, photo, a, b, c, d"
    outs = {process_caption(cap, cfg, random.Random(s), 0) for s in range(20)}
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "photo"] and sorted(tags[2:]) == ["a", "b", "c", "d"]
    assert len(outs) > 1
    assert process_caption(cap, cfg, random.Random(5), 0) == process_caption(cap, cfg, random.Random(5), 0)
    plain = DatasetConfig(tmp_path)
    assert process_caption(cap, plain, random.Random(0), 0) == cap  # no options: untouched


def test_keep_tokens_separator(tmp_path):
    cfg = DatasetConfig(tmp_path, shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    for s in range(10):
        tags = process_caption("sks, dog ||| a, b, c ||| best quality", cfg, random.Random(s), 0).split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-1] == "best quality" and sorted(tags[2:5]) == ["a", "b", "c"]


def test_caption_and_tag_dropout(tmp_path):
    cap = "k, a, b, c"
    drop_all = DatasetConfig(tmp_path, caption_dropout_rate=1.0)
    assert process_caption(cap, drop_all, random.Random(0), 0) == ""
    every2 = DatasetConfig(tmp_path, caption_dropout_every_n_epochs=2)  # kohya counts epochs from 1
    assert [process_caption(cap, every2, random.Random(0), e) for e in range(4)] == [cap, "", cap, ""]
    tags_gone = DatasetConfig(tmp_path, caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption(cap, tags_gone, random.Random(0), 0) == "k"
    half = DatasetConfig(tmp_path, caption_tag_dropout_rate=0.5)
    outs = {process_caption(cap, half, random.Random(s), 0) for s in range(30)}
    assert len(outs) > 2 and all(set(o.split(", ")) <= {"k", "a", "b", "c", ""} for o in outs)


# --- epochs ---------------------------------------------------------------------------------------
def test_batches_grouped_repeated_and_deterministic(train):
    ds = scan(small(train))
    epoch0 = list(ds.batches(0, 4, seed=1))
    assert len(epoch0) == ds.steps_per_epoch(4)
    for b in epoch0:
        assert 1 <= len(b.items) <= 4 and all(i.bucket == b.bucket for i in b.items)
    seen = Counter(i.path.name for b in epoch0 for i in b.items)
    assert seen == {"a.png": 20, "b.JPG": 20, "c.webp": 20, "d.jpeg": 10, "e.bmp": 10}

    def order(epoch, seed):
        return [tuple(i.path.name for i in b.items) for b in ds.batches(epoch, 4, seed)]

    assert order(0, 1) == order(0, 1) == order(0, 1)
    assert order(0, 1) != order(1, 1) and order(0, 1) != order(0, 2)
    assert order(0, 1) == [tuple(i.path.name for i in b.items) for b in scan(small(train)).batches(0, 4, 1)]


def _load(ds, batch) -> SimpleNamespace:
    """A batch through the trainer's item path: each slot's sample (caption, flip, crop) and its pixels."""
    samples = [ds.sample(batch, slot) for slot in range(len(batch.items))]
    return SimpleNamespace(captions=[s.caption for s in samples], pixels=torch.stack([ds.pixels(s) for s in samples]),
                           crop_top_left=[s.crop_top_left for s in samples])


def test_resume_exactly(train):
    ds = scan(small(train, shuffle_caption=True, flip_aug=True, caption_tag_dropout_rate=0.3))
    full = list(ds.iterate(3, seed=7, epochs=3))
    stop = full[len(full) // 2 + 1]  # mid-epoch
    saved = json.loads(json.dumps(stop.next_position.to_dict()))
    fresh = scan(small(train, shuffle_caption=True, flip_aug=True, caption_tag_dropout_rate=0.3))
    resumed = list(fresh.iterate(3, seed=7, start=Position.from_dict(saved), epochs=3))
    rest = full[full.index(stop) + 1:]
    assert [(b.epoch, b.index, b.items) for b in resumed] == [(b.epoch, b.index, b.items) for b in rest]
    a, b = _load(ds, rest[0]), _load(fresh, resumed[0])
    assert a.captions == b.captions and torch.equal(a.pixels, b.pixels) and a.crop_top_left == b.crop_top_left
    assert a.pixels.shape == (len(rest[0].items), 3, rest[0].bucket[1], rest[0].bucket[0])
    assert fresh.fingerprint() == ds.fingerprint()
    end = Position(0, ds.steps_per_epoch(3))  # saved after an epoch's last batch: continue with the next epoch
    assert next(ds.iterate(3, 7, start=end)).epoch == 1
    with pytest.raises(ValueError, match="beyond"):
        next(ds.batches(0, 3, 7, start=10_000))


# --- regularisation -------------------------------------------------------------------------------
def test_reg_balancing_rule(tmp_path):
    root, reg = tmp_path / "t", tmp_path / "r"
    for n in "ab":
        img(root / "5_sks dog" / f"{n}.png")                   # 2 x 5 = 10 train samples
    for n in "xyz":
        img(reg / "1_dog" / f"{n}.png")                        # 3 x 1: short -> round-robin repeats
    ds = scan(small(root, reg_dir=reg))
    reg_items = [i for i in ds.items if i.is_reg]
    assert [(i.path.name, i.repeats) for i in reg_items] == [("x.png", 4), ("y.png", 3), ("z.png", 3)]
    s = ds.summary()
    assert s["reg_images"] == 3 and s["reg_images_used"] == 3 and s["reg_images_x_repeats"] == 10
    assert s["samples_per_epoch"] == 20 and reg_items[0].caption == "dog"
    assert ds.dataset_dirs(reg=True) == {"1_dog": {"n_repeats": 1, "img_count": 3}}


def test_reg_balancing_surplus_unused(tmp_path):
    root, reg = tmp_path / "t", tmp_path / "r"
    img(root / "3_cat" / "a.png")                              # 3 train samples
    for n in "xyz":
        img(reg / "2_cat" / f"{n}.png")                        # 2 + 2 >= 3: z unused, no extra repeats
    ds = scan(small(root, reg_dir=reg))
    assert [(i.path.name, i.repeats) for i in ds.items if i.is_reg] == [("x.png", 2), ("y.png", 2)]
    assert any(p.kind == "unused_reg" for p in ds.problems)
    assert ds.tag_frequency()["2_cat"] == {"cat": 3}  # every reg image counts in the tag stats, as in kohya
    used, unused = balance_reg(0, ds.items)
    assert used == [] and len(unused) == len(ds.items)


# --- metadata shapes ------------------------------------------------------------------------------
def test_tag_frequency_and_dataset_dirs(train):
    text(train / "20_robot" / "a.txt", "Robot, red,  standing,robot")
    ds = scan(small(train))
    assert ds.tag_frequency() == {
        "20_robot": {"robot": 4, "red": 1, "standing": 1, "sitting": 1},
        "10_sks dog": {"sks dog": 2},
    }
    assert ds.dataset_dirs() == {"20_robot": {"n_repeats": 20, "img_count": 3},
                                 "10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert ds.dataset_dirs(reg=True) == {}


def test_scan_reads_headers_only(train, monkeypatch):
    from PIL import ImageFile

    def boom(self, *a, **k):
        raise AssertionError("pixels decoded during scan")

    classes = {ImageFile.ImageFile} | {f for f, _ in Image.OPEN.values() if isinstance(f, type)}
    for cls in classes:
        if "load" in vars(cls):
            monkeypatch.setattr(cls, "load", boom)
    assert len(scan(small(train))) == 5
