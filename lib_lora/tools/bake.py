"""``bake``: LoRAs merged with weights into a checkpoint, written as a single-file safetensors.

The output has the input's keys, shapes and dtypes, so the WebUI and ComfyUI load it as they load
the input; its header carries the input's metadata plus ``modelspec.merged_from``,
``ss_baked_loras`` (what went in, with weights) and ``modelspec.hash_sha256`` (sha256 of its own
tensor data).  Each tensor is read, changed in float32 exactly as the runtime patcher merges
it (deltas against the original weight, summed, cast once) and written before the next is read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import families, hashes
from ..adapters import dora
from ..fileio import TensorFile
from ..merging import Contribution
from ..network import load_network
from . import deltas, layout as layouts
from .common import STALE_KEYS, ToolError, check_output
from .layout import Layer
from .merge import Spec, layer_weight, parse_spec
from .progress import Progress
from .stream import StreamWriter

HASH_KEY = "modelspec.hash_sha256"


@dataclass
class BakeResult:
    path: Path
    sha256: str
    data_sha256: str
    layers: int


def _apply(t: Tensor, plan: list[tuple[Layer, list[Contribution], bool]]) -> Tensor:
    merged = t.float().clone() if t.dtype == torch.float32 else t.float()
    needs = any(c.adapter.needs_weight for _, cs, is_bias in plan if not is_bias for c in cs)
    original = merged.clone() if needs else merged
    fn = dora.strategy(dora.DEFAULT)
    for layer, contribs, is_bias in plan:
        rows = layer.target.rows
        view = merged if rows is None else merged[rows]
        orig = original if rows is None else original[rows]
        for c in contribs:
            c.adapter.add_delta_(view, None if is_bias else orig, c.multiplier, part="bias" if is_bias else "weight",
                                 dyn=c.dyn, dora=fn)
    return merged.to(t.dtype)


def bake(base: str | os.PathLike, specs: list[Spec | str], out: str | os.PathLike, *, force: bool = False,
         log: Callable[[str], None] = print) -> BakeResult:
    specs = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ToolError("bake needs at least one LoRA")
    out = check_output(out, [base] + [s.path for s in specs], force)
    weights = [layer_weight(s) for s in specs]
    nets = [load_network(s.path) for s in specs]
    with TensorFile(base) as tf:
        layout = layouts.from_checkpoint(tf)
        groups = deltas.group([(n, w, s.request.dyn) for n, w, s in zip(nets, weights, specs)], layout)
        plan: dict[str, list[tuple[Layer, list[Contribution], bool]]] = {}
        for layer, contribs in groups.items():
            plan.setdefault(layer.file_key, []).append((layer, contribs, False))
            with_bias = [c for c in contribs if c.adapter.has_bias]
            if with_bias:
                if layer.bias_key is None:
                    raise ToolError(f"{layer.key}: {with_bias[0].network} changes a bias this layer does not have")
                plan.setdefault(layer.bias_key, []).append((layer, with_bias, True))
        meta = {k: v for k, v in tf.metadata.items() if k not in STALE_KEYS}
        fam = layout.family
        meta.setdefault("modelspec.sai_model_spec", "1.0.0")
        meta.setdefault("modelspec.architecture", families.modelspec_architecture(fam))
        meta["modelspec.title"] = out.stem
        meta["modelspec.merged_from"] = ", ".join([Path(base).stem] + [s.path.stem for s in specs])
        meta["ss_baked_loras"] = json.dumps([{"file": s.path.name, "sha256": hashes.sha256_file(s.path),
                                              "te": s.request.te, "unet": s.request.unet, "dyn": s.request.dyn,
                                              **dict(s.extra)} for s in specs])
        specs_out = [(k, tf.dtype(k), tf.shape(k)) for k in tf.keys()]
        bar = Progress(len(specs_out), "bake")
        with StreamWriter(out, specs_out, meta, overwrite=force, hash_key=HASH_KEY) as w:
            for k in w.order:
                t = tf.get(k)
                if k in plan:
                    t = _apply(t, plan[k])
                w.write(k, t)
                del t
                bar.update(note=k)
    sha = hashes.sha256_file(out)
    log(f"wrote {out}: {len(groups)} layers changed by {', '.join(s.describe() for s in specs)}; "
        f"sha256 {sha} (AutoV2 {hashes.autov2(sha)})")
    return BakeResult(out, sha, w.data_sha256, len(groups))
