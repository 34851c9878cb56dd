"""Per-block LoRA strength in the syntax of the LoRA Block Weight extension (``lbw=``).

LBW multiplies each module's delta by the weight of the UNet block it sits in; the text
encoder is one block, ``BASE``.  Its internal form has 26 slots (BASE, IN00-IN11, M00,
OUT00-OUT11, the LDM ``input_blocks``/``middle_block``/``output_blocks`` indices);
shorter vectors name only some of them and every slot they leave out gets weight 0:

- 17 values, SD1/SD2 LoRA: the blocks holding attention (IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11);
- 12 values, SDXL LoRA: IN04 IN05 IN07 IN08 M00 OUT00-OUT05;
- 20 values, SDXL LoCon: IN00-IN08 M00 OUT00-OUT08;
- 26 values: everything.

Layers outside every block (time embedding, ``out``/``conv_out``, SDXL's label embedding, the
text encoders' embeddings and final norm) keep weight 1, as in LBW.  A value may be ``R``
(random 0..1), ``U`` (random -0.5..1.5) or ``X``/``X+d``/``X-d`` (the ``x=`` argument, default 1).
Per-element weights (``lbwe=``) are in ``elementweights.py``.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

BLOCK_IDS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
_INDEX = {b: i for i, b in enumerate(BLOCK_IDS)}

# which slots each vector length names, in order
FORMS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
    26: BLOCK_IDS,
}
_LENGTHS = "/".join(str(n) for n in FORMS)

# LBW's built-in preset list (its lbwpresets.txt starts as exactly this)
DEFAULT_PRESETS: dict[str, str] = {
    "NONE": ",".join(["0"] * 17),
    "ALL": ",".join(["1"] * 17),
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}

PRESETS_FILE = "lbwpresets.txt"
# LBW accepts a preset line only with one of these comma counts (61 = its FLUX form)
_FILE_LENGTHS = (12, 17, 20, 26, 61)


class BlockWeightError(ValueError):
    """A ``lbw=`` value that is neither a preset nor a usable weight vector."""


@dataclass(frozen=True)
class BlockWeights:
    """One weight per slot of ``BLOCK_IDS``."""
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(BLOCK_IDS):
            raise ValueError(f"BlockWeights needs {len(BLOCK_IDS)} values, got {len(self.weights)}")

    def weight(self, block: str | None) -> float:
        return 1.0 if block is None else self.weights[_INDEX[block]]

    def __str__(self) -> str:
        return ",".join(f"{w:g}" for w in self.weights)


_X = re.compile(r"^X(?:([+-])?(\d*\.?\d+))?$")  # LBW ignores a number without a sign


def _value(text: str, x: float, rng: random.Random) -> float:
    if text == "R":
        return round(rng.random(), 3)
    if text == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    m = _X.match(text)
    if m:
        if m.group(1) is None:
            return x
        return x + float(m.group(2)) if m.group(1) == "+" else x - float(m.group(2))
    return finite_number(text, hint=" (nor R, U, X)")


def finite_number(text: str, where: str = "", hint: str = "") -> float:
    """``text`` as a finite float, or a BlockWeightError naming it (after ``where``, with ``hint``)."""
    try:
        value = float(text)
    except ValueError:
        raise BlockWeightError(f"{where}{text!r} is not a number{hint}") from None
    if not math.isfinite(value):
        raise BlockWeightError(f"{where}{text!r} is not a finite number")
    return value


def parse_block_weights(spec: str, presets: Mapping[str, str] | None = None, x: float = 1.0,
                        rng: random.Random | None = None) -> BlockWeights:
    """A preset name (case-sensitive, as in LBW) or 12/17/20/26 comma-separated values."""
    presets = DEFAULT_PRESETS if presets is None else presets
    spec = spec.strip()
    text = presets.get(spec, spec)
    values = [v.strip() for v in text.split(",")]
    if len(values) not in FORMS:
        if spec not in presets and len(values) == 1:
            raise BlockWeightError(f"{spec!r} is not a block-weight preset")
        raise BlockWeightError(f"{len(values)} block weights given, expected {_LENGTHS}"
                               + (" (61 is LBW's FLUX form)" if len(values) == 61 else ""))
    rng = rng or random.Random()
    slots = [0.0] * len(BLOCK_IDS)
    for block, v in zip(FORMS[len(values)], values):
        slots[_INDEX[block]] = _value(v, x, rng)
    return BlockWeights(tuple(slots))


def read_presets(text: str) -> dict[str, str]:
    """``NAME:v1,v2,...`` lines of an lbwpresets.txt.

    Like LBW, a line counts only if it has a ':' and a known number of values and no '#'
    anywhere (that is how its file marks comments); the name is what precedes the first ':'.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line or "#" in line or line.count(",") + 1 not in _FILE_LENGTHS:
            continue
        name, _, values = line.partition(":")
        out[name.strip()] = values.strip()
    return out


def load_presets(paths: list[Path], defaults: Mapping[str, str] = DEFAULT_PRESETS,
                 read: Callable[[str], dict[str, str]] = read_presets) -> dict[str, str]:
    """``defaults`` overlaid with the presets ``read`` finds in the first readable file in ``paths``
    (LBW's block presets by default; elementweights passes its element presets)."""
    presets = dict(defaults)
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        presets.update(read(text))
        break
    return presets


class PresetSource:
    """Presets from the first existing file among ``candidates()``, re-read only when it changes.

    ``load`` reads a list of files as ``load_presets`` does; ``defaults`` stand when none exists
    (``elementweights`` passes its own pair for elempresets.txt)."""

    def __init__(self, candidates: Callable[[], list[Path]],
                 load: Callable[[list[Path]], dict[str, str]] = load_presets,
                 defaults: Mapping[str, str] = DEFAULT_PRESETS):
        self._candidates = candidates
        self._load = load
        self._defaults = dict(defaults)
        self._key: tuple | None = None
        self._presets: dict[str, str] = dict(defaults)

    def current(self) -> dict[str, str]:
        for path in self._candidates():
            try:
                st = Path(path).stat()
            except OSError:
                continue
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key != self._key:
                self._presets, self._key = self._load([Path(path)]), key
            return self._presets
        self._key, self._presets = None, dict(self._defaults)
        return self._presets

    def lazy(self) -> Mapping[str, str]:
        """A mapping that reads (or re-stats) the file only when an ``lbw=`` value is looked up in it."""
        return _Lazy(self.current)


class _Lazy(Mapping):
    def __init__(self, load: Callable[[], dict[str, str]]):
        self._load, self._data = load, None

    def _get(self) -> dict[str, str]:
        if self._data is None:
            self._data = self._load()
        return self._data

    def __getitem__(self, key: str) -> str:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


# -- which block a layer belongs to ------------------------------------------------------------

_LDM = re.compile(r"^lora_unet_(?:(input_blocks|output_blocks)_(\d+)_|(middle_block)_)")
_DIFF_DOWN = re.compile(r"^lora_unet_down_blocks_(\d+)_(?:(?:resnets|attentions)_(\d+)|(downsamplers)_0)_")
_DIFF_UP = re.compile(r"^lora_unet_up_blocks_(\d+)_(?:(?:resnets|attentions)_(\d+)|(upsamplers)_0)_")


def _slot(kind: str, index: int) -> str | None:
    return f"{kind}{index:02d}" if 0 <= index < 12 else None


def block_of(key: str) -> str | None:
    """The LBW block of a kohya module key in either UNet spelling; None outside every block.

    diffusers indices follow from SD's two resnets per down level and three per up level:
    down_blocks.L.{resnets,attentions}.J = input_blocks.3L+1+J, its downsampler = 3L+3;
    up_blocks.L.{resnets,attentions}.J = output_blocks.3L+J, its upsampler = 3L+2.
    """
    if key.startswith("lora_te"):  # the encoder layers of CLIP (and of SD3's T5, whose layers are blocks)
        return "BASE" if "_encoder_layers_" in key or key.startswith("lora_te3_encoder_block_") else None
    key_ = key + "_"
    m = _LDM.match(key_)
    if m:
        if m.group(3):
            return "M00"
        return _slot("IN" if m.group(1) == "input_blocks" else "OUT", int(m.group(2)))
    if key_.startswith("lora_unet_mid_block_"):
        return "M00"
    if key_.startswith("lora_unet_conv_in_"):
        return "IN00"
    m = _DIFF_DOWN.match(key_)
    if m:
        level = int(m.group(1))
        return _slot("IN", 3 * level + 3 if m.group(3) else 3 * level + 1 + int(m.group(2)))
    m = _DIFF_UP.match(key_)
    if m:
        level = int(m.group(1))
        return _slot("OUT", 3 * level + 2 if m.group(3) else 3 * level + int(m.group(2)))
    return None


def target_block(keys: list[str]) -> str | None:
    """The block of a layer known by several spellings; the LDM one (exact for any layout) first."""
    for k in keys:
        if _LDM.match(k + "_"):
            return block_of(k)
    for k in keys:
        b = block_of(k)
        if b is not None:
            return b
    return None
