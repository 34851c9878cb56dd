"""Toy world: deterministic captioned images, kohya export, and the image-analysis scorer.

Scorer accuracy measured on 1500 held-out FULL_WORLD images (seed 777, every shape incl.
the star, every background incl. diagonal):
    clean                                   shape 100%    colour 100%  background 100%
    MILD   (blur 1.0, noise 8,  shift 10)   shape 100%    colour 100%  background 100%
    STRONG (blur 1.5, noise 12, shift 15)   shape 99.93%  colour 100%  background 100%
    blur 2.0, noise 16, shift 20            shape 97.7%   colour 100%  background 100%
The tests below use 150 fresh images per condition (seed 2024) and assert 98% / 97% / 95%.
"""
from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from lib_lora.toyworld import (
    BACKGROUNDS, BASE_WORLD, CONCEPTS, FULL_WORLD, MILD, PALETTE, SHAPES, SIDE, STRONG, Scene, accuracy, caption,
    degrade, generate, render, sample_scene, score, write_kohya_dataset,
)
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.scan import scan


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = generate(6, 11, FULL_WORLD), generate(6, 11, FULL_WORLD), generate(6, 12, FULL_WORLD)
    assert [png(i) for i, _, _ in a] == [png(i) for i, _, _ in b]
    assert [(t, s) for _, t, s in a] == [(t, s) for _, t, s in b]
    assert [png(i) for i, _, _ in a] != [png(i) for i, _, _ in c]


def test_sampling_is_pinned():
    # stdlib random is stable across platforms/versions: a change here silently changes every dataset.
    assert [t for _, t, _ in generate(3, 0)] == [
        "a cyan diamond on a plain light background",
        "a green diamond on a dotted background",
        "a blue circle on a striped background",
    ]


def test_caption_format_and_trigger_words():
    s = Scene("circle", "red", "striped", 32, 32, 30)
    assert caption(s) == "a red circle on a striped background"
    assert caption(Scene("star", "red", "light", 32, 32, 30), CONCEPTS["star"].words) == \
        "a red zkx on a plain light background"
    assert caption(Scene("cross", "blue", "diagonal", 32, 32, 30), CONCEPTS["diagonal"].words) == \
        "a blue cross on a qwv background"
    words = "|".join(v.replace(" ", r"\ ") for v in BACKGROUNDS.values())
    pattern = re.compile(rf"a ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) on a ({words}) background")
    assert all(pattern.fullmatch(t) for _, t, _ in generate(40, 3, FULL_WORLD))


def test_objects_inside_frame_and_sized():
    rng = random.Random(5)
    for _ in range(200):
        s = sample_scene(rng, FULL_WORLD.shapes)
        assert 0.3 * SIDE <= s.size <= 0.6 * SIDE
        assert s.size / 2 + 2 <= s.cx <= SIDE - s.size / 2 - 2 and s.size / 2 + 2 <= s.cy <= SIDE - s.size / 2 - 2
    for image, _, s in generate(30, 6, FULL_WORLD):
        a = np.asarray(image, dtype=int)
        assert image.size == (SIDE, SIDE) and image.mode == "RGB"
        ys, xs = np.nonzero(a.max(-1) - a.min(-1) > 60)          # object = the only saturated pixels
        assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= SIDE - 2 and ys.max() <= SIDE - 2
        assert 0.25 * SIDE <= max(np.ptp(xs), np.ptp(ys)) + 1 <= 0.65 * SIDE


def test_base_world_holds_out_the_concepts():
    base = [s for _, _, s in generate(300, 8)]
    assert {s.shape for s in base} == set(BASE_WORLD.shapes) and "star" not in BASE_WORLD.shapes
    assert {s.background for s in base} == set(BASE_WORLD.backgrounds) and "diagonal" not in BASE_WORLD.backgrounds
    assert {s.colour for s in base} == set(PALETTE)
    assert {s.shape for _, _, s in generate(20, 1, CONCEPTS["star"].world)} == {"star"}
    with pytest.raises(ValueError, match="unknown shape"):
        sample_scene(random.Random(0), shapes=["hexagon"])


def test_kohya_dataset_layout(tmp_path):
    folder = write_kohya_dataset(tmp_path, "star", n=5, repeats=10, seed=0)
    assert folder == tmp_path / "10_zkx"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"img_{i}.{e}" for i in range(5) for e in ("png", "txt"))
    captions = [(folder / f"img_{i}.txt").read_text(encoding="utf-8") for i in range(5)]
    assert all(re.fullmatch(r"a \w+ zkx on a [a-z ]+ background", c) for c in captions)
    # Re-writing with the same seed reproduces the files byte for byte.
    first = (folder / "img_3.png").read_bytes()
    write_kohya_dataset(tmp_path / "again", CONCEPTS["star"], n=5, repeats=10, seed=0)
    assert (tmp_path / "again" / "10_zkx" / "img_3.png").read_bytes() == first
    # And the project's own kohya reader accepts it.
    ds = scan(DatasetConfig(tmp_path / "again", resolution=64, min_bucket_reso=64, max_bucket_reso=128))
    assert len(ds) == 5 and ds.samples_per_epoch == 50 and {i.caption for i in ds.items} == set(captions)


def test_scorer_reads_a_rendered_scene():
    s = Scene("star", "cyan", "diagonal", 30.0, 34.0, 26.0, phase=3)
    got = score(render(s))
    assert (got.shape, got.colour, got.background) == ("star", "cyan", "diagonal")
    assert all(0.0 <= v <= 1.0 for v in got.confidences.values()) and min(got.confidences.values()) > 0.3
    assert score(np.asarray(render(s))) == got                                  # arrays work too
    empty = score(Image.new("RGB", (SIDE, SIDE), (40, 40, 40)))                 # no object at all
    assert (empty.shape, empty.colour, empty.background) == (None, None, "dark")


@pytest.mark.parametrize("condition, floor", [(None, 0.98), (MILD, 0.97), (STRONG, 0.95)])
def test_scorer_accuracy_on_held_out_images(condition, floor):
    r = accuracy(150, 2024, degrade=condition)
    for attribute in ("shape", "colour", "background"):
        assert r[attribute] >= floor, (attribute, r)


@pytest.mark.parametrize("condition", [None, STRONG])
def test_scorer_shape_confusion_no_other_shape_reads_as_a_star(condition):
    """Per drawn shape: what the scorer reads.  Star acquisition counts images read as "star", so a
    scorer that accepted another shape as a star would inflate it: no non-star may be read as one."""
    rng = np.random.default_rng(5)
    confusion: dict[tuple[str, str | None], int] = {}
    for image, _, scene in generate(180, 31, FULL_WORLD):
        got = score(image if condition is None else degrade(image, condition, rng)).shape
        confusion[scene.shape, got] = confusion.get((scene.shape, got), 0) + 1
    drawn = {s: sum(v for (t, _), v in confusion.items() if t == s) for s in SHAPES}
    assert min(drawn.values()) >= 20, drawn                       # every shape is drawn often enough
    assert sum(v for (t, g), v in confusion.items() if g == "star" and t != "star") == 0, confusion
    for shape in SHAPES:
        assert confusion.get((shape, shape), 0) >= 0.95 * drawn[shape], (shape, confusion)


def test_degrade_is_seeded():
    image = render(Scene("square", "green", "checkered", 32, 32, 30))
    a = degrade(image, STRONG, np.random.default_rng(1))
    assert png(a) == png(degrade(image, STRONG, np.random.default_rng(1))) and png(a) != png(image)


def test_scorer_on_generated_images_labelled_by_eye():
    """120 images drawn by star LoRAs (tests/data/toyworld_generated_stars.json says which) and labelled by
    eye: star, ambiguous or another shape.  Acquisition counts images read as "star", so the scorer must
    find the drawn stars without reading blobs and other shapes as stars.  Before the box refinement it
    read 33 of the 47 eye-labelled stars (70%) and 0 of the 48 others; now 39 (83%) and 1 (a pentagon-like
    blob)."""
    from pathlib import Path
    import json

    data = Path(__file__).parent / "data"
    meta = json.loads((data / "toyworld_generated_stars.json").read_text())
    sheet, cell, cols = Image.open(data / "toyworld_generated_stars.png").convert("RGB"), meta["cell"], meta["columns"]
    read = {"star": [], "other": [], "ambiguous": []}
    for k, label in enumerate(meta["labels"]):
        x, y = (k % cols) * cell, (k // cols) * cell
        read[label].append(score(sheet.crop((x, y, x + cell, y + cell))).shape == "star")
    assert (len(read["star"]), len(read["other"])) == (47, 48)
    assert sum(read["star"]) >= 0.8 * len(read["star"]), sum(read["star"])
    assert sum(read["other"]) <= 1, sum(read["other"])
