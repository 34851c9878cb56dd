"""A synthetic "toy world": 64x64 images of one coloured shape on a textured background.

A tiny SD1-layout model trained on this world lets LoRA training be *measured*: a
concept is held out of the base world (a shape, a background pattern), a LoRA is
trained on it under a trigger word, and ``scorer.score`` reads back what each
generated image shows.

Design choices that keep images scorable by plain image analysis:
  * backgrounds are achromatic (greys), objects are saturated colours, so the
    object can be segmented by chroma whatever the texture;
  * the palette is six hues 60 degrees apart, so hue alone names the colour;
  * shapes are never rotated (a square rotated 45 degrees *is* the diamond), so a
    shape fitted to the object's bounding box identifies it;
  * texture features are 4-6 px wide (stripes, cells, dots), coarse enough to survive blur.

All randomness comes from ``random.Random(seed)`` (stdlib, stable across
platforms), so the same seed gives byte-identical PNGs.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64
_SS = 4                      # supersampling factor for anti-aliased shape edges
MIN_SIZE, MAX_SIZE = 0.30, 0.60   # object extent as a fraction of the side
_MARGIN = 2.0                # px kept clear between object and frame

# Six hues 60 degrees apart (red 0, yellow 60, ... magenta 300), all strongly saturated.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 30),
    "green": (40, 190, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 220),
    "magenta": (200, 50, 200),
}


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / points - math.pi / 2            # first point straight up
        out.append((r * math.cos(a), r * math.sin(a)))
    return tuple(out)


_ARM = 1 / 3   # cross arm half-width: a thick "+" whose bbox fill differs from the diamond's
# Shapes in unit coordinates (y down), drawn inside [-1, 1]^2; None = ellipse.
SHAPES: dict[str, tuple[tuple[float, float], ...] | None] = {
    "circle": None,
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "cross": ((-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
              (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)),
    "star": _star(),
}

# Background name -> caption words.
BACKGROUNDS: dict[str, str] = {
    "light": "plain light",
    "dark": "plain dark",
    "striped": "striped",       # horizontal stripes, period 8
    "checkered": "checkered",   # 6 px cells
    "dotted": "dotted",         # dark dots on an 8 px grid
    "diagonal": "diagonal",     # stripes along x+y, ~8.5 px apart (held out of the base world)
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float          # object centre, px
    cy: float
    size: float        # object extent (side of its bounding square), px
    phase: int = 0     # texture offset in px: same pattern, different alignment


@dataclass(frozen=True)
class World:
    """A sampling domain: which attribute values may appear."""
    shapes: tuple[str, ...]
    colours: tuple[str, ...] = tuple(PALETTE)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class Concept:
    """A held-out attribute value, taught to a LoRA under a trigger word.

    ``world`` is where its training images come from; captions replace the held-out
    value's word with ``trigger`` ("a red zkx on a striped background").
    """
    name: str
    trigger: str
    attribute: str       # "shape" | "colour" | "background"
    value: str
    world: World

    @property
    def words(self) -> dict[str, str]:
        return {self.value: self.trigger}


_BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_BASE_BACKGROUNDS = ("light", "dark", "striped", "checkered", "dotted")
# What the base model is trained on: no star, no diagonal stripes.
BASE_WORLD = World(shapes=_BASE_SHAPES, backgrounds=_BASE_BACKGROUNDS)
# Everything the scorer knows (base + every concept), for scorer evaluation.
FULL_WORLD = World(shapes=tuple(SHAPES), backgrounds=tuple(BACKGROUNDS))
CONCEPTS: dict[str, Concept] = {
    # A new object: stars in every base colour and background.
    "star": Concept("star", "zkx", "shape", "star", World(shapes=("star",), backgrounds=_BASE_BACKGROUNDS)),
    # A new style: diagonal stripes behind every base shape and colour.
    "diagonal": Concept("diagonal", "qwv", "background", "diagonal",
                        World(shapes=_BASE_SHAPES, backgrounds=("diagonal",))),
}


def sample_scene(rng: random.Random, shapes: Iterable[str] | None = None, colours: Iterable[str] | None = None,
                 backgrounds: Iterable[str] | None = None) -> Scene:
    shapes = tuple(shapes or BASE_WORLD.shapes)
    colours = tuple(colours or BASE_WORLD.colours)
    backgrounds = tuple(backgrounds or BASE_WORLD.backgrounds)
    for name, allowed, known in (("shape", shapes, SHAPES), ("colour", colours, PALETTE),
                                 ("background", backgrounds, BACKGROUNDS)):
        if unknown := [v for v in allowed if v not in known]:
            raise ValueError(f"unknown {name}(s) {unknown}; known: {list(known)}")
    shape, colour, background = rng.choice(shapes), rng.choice(colours), rng.choice(backgrounds)
    size = round(rng.uniform(MIN_SIZE, MAX_SIZE) * SIDE, 2)
    lo, hi = size / 2 + _MARGIN, SIDE - size / 2 - _MARGIN
    cx, cy = round(rng.uniform(lo, hi), 2), round(rng.uniform(lo, hi), 2)
    return Scene(shape, colour, background, cx, cy, size, phase=rng.randrange(8))


def background_array(name: str, phase: int = 0) -> np.ndarray:
    """Grey level (float, 0..255) of a background texture, shape (SIDE, SIDE)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    x, y = x + phase, y + phase
    if name == "light":
        g = np.full((SIDE, SIDE), 225.0)
    elif name == "dark":
        g = np.full((SIDE, SIDE), 40.0)
    elif name == "striped":
        g = np.where((y // 4) % 2 == 0, 210.0, 110.0)
    elif name == "checkered":
        g = np.where((x // 6 + y // 6) % 2 == 0, 205.0, 105.0)
    elif name == "dotted":
        # Radius-2 dots centred in 8 px cells: ~20% dark, which is what tells dots from checks.
        dx, dy = x % 8 - 3.5, y % 8 - 3.5
        g = np.where(dx * dx + dy * dy <= 5.0, 90.0, 215.0)
    elif name == "diagonal":
        g = np.where(((x + y) // 6) % 2 == 0, 210.0, 110.0)
    else:
        raise ValueError(f"unknown background {name!r}; known: {list(BACKGROUNDS)}")
    return g


def shape_mask(shape: str, box: tuple[float, float, float, float], width: int = SIDE,
               height: int = SIDE) -> np.ndarray:
    """Anti-aliased coverage (0..1) of ``shape`` stretched so its own extent fills ``box``.

    ``box`` = (x0, y0, x1, y1) in px, edges not pixel centres.  The shape's *own*
    bounding box (a star's is not square) is mapped onto ``box``; the scorer uses the
    same mapping to fit candidate shapes to a segmented object.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    canvas = Image.new("L", (width * _SS, height * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * _SS for v in box)
    pts = SHAPES[shape]
    if pts is None:
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax, ay = min(xs), min(ys)
        sx, sy = (x1 - x0) / (max(xs) - ax), (y1 - y0) / (max(ys) - ay)
        draw.polygon([(x0 + (px - ax) * sx, y0 + (py - ay) * sy) for px, py in pts], fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0


def scene_box(scene: Scene) -> tuple[float, float, float, float]:
    """Pixel box the object fills: shapes keep their own aspect inside a size x size square."""
    pts = SHAPES[scene.shape]
    h = scene.size / 2
    if pts is None:
        return scene.cx - h, scene.cy - h, scene.cx + h, scene.cy + h
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return scene.cx + min(xs) * h, scene.cy + min(ys) * h, scene.cx + max(xs) * h, scene.cy + max(ys) * h


def render(scene: Scene) -> Image.Image:
    bg = background_array(scene.background, scene.phase)[..., None]
    alpha = shape_mask(scene.shape, scene_box(scene))[..., None]
    rgb = bg * (1 - alpha) + np.asarray(PALETTE[scene.colour], dtype=np.float64) * alpha
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def caption(scene: Scene, words: Mapping[str, str] | None = None) -> str:
    """"a red circle on a striped background"; ``words`` renames values (trigger words)."""
    w = dict(words or {})
    colour, shape = w.get(scene.colour, scene.colour), w.get(scene.shape, scene.shape)
    background = w.get(scene.background, BACKGROUNDS[scene.background])
    return f"a {colour} {shape} on a {background} background"


def generate(n: int, seed: int, world: World | None = None, words: Mapping[str, str] | None = None,
             shapes: Iterable[str] | None = None, colours: Iterable[str] | None = None,
             backgrounds: Iterable[str] | None = None) -> list[tuple[Image.Image, str, Scene]]:
    """``n`` (image, caption, scene) triples; ``world`` (default BASE_WORLD) or explicit filters."""
    world = world or BASE_WORLD
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = sample_scene(rng, shapes or world.shapes, colours or world.colours, backgrounds or world.backgrounds)
        out.append((render(s), caption(s, words), s))
    return out


def write_kohya_dataset(root: str | Path, concept: Concept | str, n: int, repeats: int = 10,
                        seed: int = 0) -> Path:
    """Write ``root/<repeats>_<trigger>/img_N.png`` + ``img_N.txt``; returns that folder."""
    c = CONCEPTS[concept] if isinstance(concept, str) else concept
    folder = Path(root) / f"{repeats}_{c.trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, text, _) in enumerate(generate(n, seed, c.world, c.words)):
        image.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(text, encoding="utf-8")
    return folder
