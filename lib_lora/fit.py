"""Whether a LoRA file fits the loaded model, judged from its safetensors header alone.

A card's family badge comes from the file's metadata or else from its key spelling and
cross-attention width (``families``).  A file that says neither may still be made for the loaded
model, and applies then.  To tell, each module of the file is looked up in the ModelMap, and where
the stored shapes say which weight they change (LoRA/LoCon, LoHa, LoKr, Full, Norm) its size is
compared with the layer's; the other algorithms are judged by their key alone.

The library's scan reads every header anyway; for a file whose metadata names no family it keeps
the ``Layout`` (module names, interned, and sizes; no tensor data).  ``FitCache`` keeps each verdict
per file version and ModelMap, so building a page of hundreds of cards reads no file.
"""
from __future__ import annotations

import functools
import math
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import families
from .keymap import split_key
from .modelmap import ModelMap
from .network import dual_text_encoders

if TYPE_CHECKING:
    from .library import Entry

Dims = tuple[int, int]
# files from one trainer share their key names: a library of them splits each name once
_split_key = functools.lru_cache(maxsize=1 << 15)(split_key)  # (output rows, everything else a row holds), as the weight would be flattened


@dataclass(frozen=True)
class Layout:
    """What a header says about a file's modules."""
    family: str | None                          # from keys and shapes, as ``families.family_from_keys``
    modules: tuple[tuple[str, Dims | None], ...]  # module key (kohya spelling), implied weight size if known


@dataclass(frozen=True)
class Fit:
    fits: bool
    matched: int      # modules with a layer of that name in the model...
    total: int
    mismatched: int   # ...of which their stored shapes do not fit the layer
    example: str = ""  # a module that has no layer or does not fit it


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def implied_dims(roles: dict[str, tuple[int, ...]]) -> Dims | None:
    """The (out, in x kernel) size of the weight these tensors change, where the shapes alone say it."""
    r = roles
    if "lora_up.weight" in r and "lora_down.weight" in r:
        up, down = r["lora_up.weight"], r["lora_down.weight"]
        mid = r.get("lora_mid.weight")
        if len(up) < 2 or len(down) < 2:
            return None
        inner = down[1] * _prod(mid[2:] if mid is not None and len(mid) > 2 else down[2:])
        return up[0], inner
    if "hada_w1_a" in r and "hada_w1_b" in r and "hada_t1" not in r:
        a, b = r["hada_w1_a"], r["hada_w1_b"]
        return (a[0], _prod(b[1:])) if len(a) == 2 and len(b) >= 2 else None
    if "lokr_t2" not in r and all(f"lokr_w{i}" in r or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(r) for i in (1, 2)):
        # W = kron(w1, w2): w_i whole, or w_i_a [rows, r] @ w_i_b [r, cols(*kernel)]
        w1, w2 = ((r[f"lokr_w{i}"] if f"lokr_w{i}" in r else r[f"lokr_w{i}_a"][:1] + r[f"lokr_w{i}_b"][1:])
                  for i in (1, 2))
        if len(w1) != 2 or len(w2) < 2:
            return None
        return w1[0] * w2[0], w1[1] * _prod(w2[1:])
    if "diff" in r:
        d = r["diff"]
        return (d[0], _prod(d[1:])) if d else None
    if "w_norm" in r:
        return (r["w_norm"][0], 1) if len(r["w_norm"]) == 1 else None
    return None


def read_layout(shapes: dict[str, tuple[int, ...]]) -> Layout:
    """A header's tensor shapes (name -> shape) grouped into modules."""
    dual = dual_text_encoders(shapes)
    groups: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, shape in shapes.items():
        split = _split_key(key, dual)
        if split is not None:
            groups[sys.intern(split[0])][split[1]] = tuple(shape)
    modules = {m: roles for m, roles in groups.items() if set(roles) - {"alpha", "dora_scale"}}
    flat = {f"{m}.{role}": s for m, roles in modules.items() for role, s in roles.items()}
    return Layout(families.family_from_keys(set(modules), flat),
                  tuple((m, implied_dims(roles)) for m, roles in modules.items()))


def fit(layout: Layout, mm: ModelMap) -> Fit:
    matched = mismatched = 0
    example = ""
    for key, dims in layout.modules:
        target = mm.get(key)
        if target is None:
            example = example or f"{key} has no layer in the loaded model"
            continue
        matched += 1
        w = target.weight()
        if dims is not None and dims != (w.shape[0], _prod(tuple(w.shape[1:]))):
            mismatched += 1
            example = example or f"{key} changes a {dims[0]}x{dims[1]} weight, the layer's is {tuple(w.shape)}"
    total = len(layout.modules)
    return Fit(total > 0 and matched == total and not mismatched, matched, total, mismatched, example)


class FitCache:
    """Verdicts per file version and ModelMap, for the cards."""

    def __init__(self) -> None:
        self._fits: dict[Path, tuple[tuple[float, int], weakref.ref, Fit]] = {}

    def fit(self, entry: "Entry", mm: ModelMap) -> Fit | None:
        """None for a file without a layout (its header is unreadable, it is a pickle, which would have
        to be loaded whole, or its metadata names its family)."""
        if entry.layout is None:
            return None
        version = (entry.mtime, entry.size)
        hit = self._fits.get(entry.path)
        if hit is not None and hit[0] == version and hit[1]() is mm:
            return hit[2]
        verdict = fit(entry.layout, mm)
        self._fits[entry.path] = (version, weakref.ref(mm), verdict)
        return verdict

    def prune(self, live: set[Path]) -> None:
        """Forget files no longer in the library."""
        for p in [p for p in self._fits if p not in live]:
            del self._fits[p]
