"""LoRA Block Weight's per-element weights (``lbwe=NAME``, its "Elemental" feature).

``NAME`` is a preset of directives ``blocks:elements:weight``.  A directive matches a layer when
one of its block words and one of its element words occur in the layer's LBW name: the name the
built-in Lora gives the layer (``diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
followed by its block (``IN04``).  So ``IN05-OUT05:attn:0`` zeroes every attention layer from IN05
to OUT05, and ``::0`` every layer, including those outside every block.  The last matching
directive's weight replaces the layer's ``lbw=`` block weight (1 without ``lbw=``); the te/unet
weight still multiplies it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .blockweights import BLOCK_IDS, BlockWeightError, finite_number, load_presets

_INDEX = {b: i for i, b in enumerate(BLOCK_IDS)}

# LBW's built-in element presets (its elempresets.txt starts as exactly this)
DEFAULT_ELEMENT_PRESETS: dict[str, str] = {
    "ATTNDEEPON": "IN05-OUT05:attn:1",
    "ATTNDEEPOFF": "IN05-OUT05:attn:0",
    "PROJDEEPOFF": "IN05-OUT05:proj:0",
    "XYZ": "::1",
}
ELEMENT_PRESETS_FILE = "elempresets.txt"


@dataclass(frozen=True)
class Directive:
    """``blocks:elements:weight``; each side a space-separated list of words, ``NOT`` first negating it."""
    blocks: tuple[str, ...]
    not_blocks: bool
    elements: tuple[str, ...]
    not_elements: bool
    weight: float

    def matches(self, lbw_name: str) -> bool:
        return (any(b in lbw_name for b in self.blocks) != self.not_blocks
                and any(e in lbw_name for e in self.elements) != self.not_elements)


@dataclass(frozen=True)
class ElementWeights:
    """One ``lbwe=`` preset, parsed."""
    name: str
    directives: tuple[Directive, ...]

    def weight(self, layer: str | None, block: str | None, base: float) -> float:
        """The weight of the layer named ``layer`` (see ``lbw_layer_name``) in ``block``, whose block
        weight is ``base``: the last matching directive's, else ``base``."""
        if layer is None:
            return base
        key = layer + (block or "")
        for d in self.directives:
            if d.matches(key):
                base = d.weight
        return base


def _words(text: str, ranges: bool) -> tuple[tuple[str, ...], bool]:
    words = text.split(" ")
    negated = words[0] == "NOT"
    if negated:
        words = words[1:]
    out: list[str] = []
    for w in words:
        if ranges and "-" in w:
            a, sep, b = w.partition("-")
            if a not in _INDEX or b not in _INDEX or "-" in b:
                raise BlockWeightError(f"{w!r} is not a range of blocks like IN05-OUT05")
            lo, hi = sorted((_INDEX[a], _INDEX[b]))
            out += BLOCK_IDS[lo:hi + 1]
        else:
            out.append(w)  # an empty word (from "::1" or a double space) occurs in every name
    return tuple(out), negated


def parse_element_weights(name: str, presets: Mapping[str, str] | None = None) -> ElementWeights:
    """The element preset ``name``: its directives, separated by commas or new lines.

    As in LBW, a piece without exactly two ':' is skipped, words match as substrings, and a
    range ``A-B`` of blocks (either order) stands for every block between them."""
    presets = DEFAULT_ELEMENT_PRESETS if presets is None else presets
    name = name.strip()
    if name not in presets:
        raise BlockWeightError(f"{name!r} is not an element-weight preset")
    directives = []
    for piece in presets[name].replace("\n", ",").split(","):
        if piece.count(":") != 2:
            continue
        blocks, elements, weight = piece.split(":")
        value = finite_number(weight, where=f"{piece!r}: ")
        directives.append(Directive(*_words(blocks, True), *_words(elements, False), value))
    return ElementWeights(name, tuple(directives))


def read_element_presets(text: str) -> dict[str, str]:
    """``NAME:directives`` entries of an elempresets.txt, separated by empty lines; the directives
    may span several lines.  An entry without ':' is skipped."""
    out: dict[str, str] = {}
    for entry in text.replace("\r\n", "\n").split("\n\n"):
        if ":" not in entry:
            continue
        name, _, directives = entry.partition(":")
        out[name.strip()] = directives
    return out


def load_element_presets(paths: list[Path]) -> dict[str, str]:
    """LBW's default element presets overlaid with those of the first readable file in ``paths``."""
    return load_presets(paths, DEFAULT_ELEMENT_PRESETS, read_element_presets)


_DIFFUSERS_UNET = tuple(f"lora_unet_{p}" for p in ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out",
                                                   "conv_norm_out", "time_embedding_", "add_embedding_"))
_TE = re.compile(r"^lora_te([12]?)_text_model_(.+)$")
_LAYER = re.compile(r"^encoder_layers_(\d+)_(.+)$")
# kohya's (HF) names of OpenCLIP layers -> the modules' own; q/k/v live in the fused in_proj
_OPEN_CLIP_PARTS = {"self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj",
                    "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_OPEN_CLIP_TOP = {"final_layer_norm": "ln_final", "embeddings_token_embedding": "token_embedding"}


def lbw_layer_name(keys: list[str], family: str) -> str | None:
    """The name the WebUI's built-in Lora gives a layer, which LBW matches element words against,
    from the layer's kohya spellings (``Target.key`` first); None for SD3, where LBW has no names.

    The WebUI names a layer by its module path (dots as underscores) under ``diffusion_model``, the
    text encoder it wraps (SD1: ``transformer_text_model_…``) or, on SDXL, under its embedder's index
    (``0_transformer_text_model_…``, ``1_model_transformer_resblocks_…``; SD2: ``model_…``).  The
    OpenCLIP q/k/v projections are one fused module; the built-in names their parts as it converts
    kohya's keys: ``…resblocks_N_attn_q_proj`` (``_k_``, ``_v_``).
    """
    if family == "sd3":
        return None
    for k in keys:
        if k.startswith("lora_unet_") and not k.startswith(_DIFFUSERS_UNET):
            return "diffusion_model_" + k[len("lora_unet_"):]
    m = _TE.match(keys[0]) if keys else None
    if m is None:
        return None
    which, rest = m.group(1), m.group(2)
    if (family, which) in (("sd2", ""), ("sdxl", "2")):  # OpenCLIP
        prefix = "1_model_" if which == "2" else "model_"
        layer = _LAYER.match(rest)
        if layer is None:
            return prefix + _OPEN_CLIP_TOP.get(rest, rest)
        part = layer.group(2)
        part = _OPEN_CLIP_PARTS.get(part, part.replace("self_attn", "attn"))
        return f"{prefix}transformer_resblocks_{layer.group(1)}_{part}"
    return f"{'0_' if which == '1' and family == 'sdxl' else ''}transformer_text_model_{rest}"
