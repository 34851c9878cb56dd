"""``extract``: a LoRA (or LoCon) from two checkpoints of one family: the base and a fine-tune.

kohya's published ``extract_lora_from_models.py`` behaviour, written independently: per layer
the SVD of (tuned - base), the singular values folded into ``lora_up`` and alpha = rank (scale 1);
``lora_up`` and ``lora_down`` are clamped together to +-the ``clamp_quantile`` quantile of their
values (default 0.99; 1 turns it off); the text encoder is left out when no layer of it differs
by more than ``min_diff``.  Layers: the UNet's transformer blocks and the text encoders'
attention/MLP linears; with a conv rank also the resnet blocks and up/down-samplers (3x3 convs
at the conv rank, their linears and 1x1 convs at the rank).  Both files are read one tensor at
a time.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..fileio import TensorFile, save_safetensors
from ..training.metadata import architecture, base_model_version
from . import layout as layouts, svd
from .common import CheckpointMismatchError, ToolError, check_output, network_meta
from .layout import Layer
from .lowrank import LayerResult, LowRankResult, lora_tensors, report_lines
from .progress import Progress


@dataclass
class ExtractResult:
    path: Path
    result: LowRankResult
    lines: list[str]
    text_encoder: bool


def targets(layout: layouts.Layout, convs: bool) -> list[Layer]:
    """The layers kohya's LoRA trains (and so extracts), text encoders first."""
    keep = [l for l in layout.layers if len(l.shape) >= 2 and
            (l.role in ("attn", "te") or (convs and l.role == "resnet"))]
    return sorted(keep, key=lambda l: not l.target.is_text_encoder)


def clamp_quantile(up: Tensor, down: Tensor, q: float) -> None:
    """Clamp both factors in place to +-(the q-quantile of all their values)."""
    if q >= 1:
        return
    values = torch.cat([up.flatten(), down.flatten()]).float().cpu().numpy()
    import numpy as np
    hi = float(np.quantile(values, q))
    up.clamp_(-hi, hi)
    down.clamp_(-hi, hi)


def _weight(tf: TensorFile, layer: Layer, dev: torch.device) -> Tensor:
    w = tf.get(layer.file_key)
    if layer.target.rows is not None:
        w = w[layer.target.rows]
    return w.to(dev, torch.float32)


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *, rank: int = 4,
            conv_rank: Optional[int] = None, method: Optional[str] = None, param: Optional[float] = None,
            clamp: float = 0.99, min_diff: float = 0.01, dtype: torch.dtype | None = torch.float16,
            force: bool = False, device: Optional[str] = None, limit: Optional[int] = None,
            log: Callable[[str], None] = print, per_layer: bool = False) -> ExtractResult:
    """``limit``: only the first N layers (benchmarks on small machines)."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ToolError("ranks must be at least 1")
    if not 0 < clamp <= 1:
        raise ToolError(f"clamp quantile must be in (0, 1], not {clamp}")
    if method is not None and (param is None or param <= 0):
        raise ToolError(f"{method} needs a positive --dynamic-param")
    out = check_output(out, [base, tuned], force)
    dev = svd.device(device)
    res = LowRankResult()
    with contextlib.ExitStack() as stack:
        tb = stack.enter_context(TensorFile(base))
        tt = stack.enter_context(TensorFile(tuned))
        layout = layouts.from_checkpoint(tb)
        try:
            other = layouts.from_checkpoint(tt).family
        except ToolError as e:
            raise CheckpointMismatchError(f"{Path(tuned).name} is not a checkpoint like {Path(base).name}: {e}") from None
        if other != layout.family:
            raise CheckpointMismatchError(f"{Path(base).name} is {layout.family}, {Path(tuned).name} is {other}")
        chosen = targets(layout, conv_rank is not None)[:limit]
        for layer in chosen:
            if layer.file_key not in tt or tt.shape(layer.file_key) != tb.shape(layer.file_key):
                raise CheckpointMismatchError(f"{Path(tuned).name}: {layer.file_key} is missing or shaped "
                                              f"differently from {Path(base).name}")
        bar = Progress(len(chosen), "extract")
        te_results: list[tuple[LayerResult, dict[str, Tensor]]] = []
        te_max = 0.0
        for layer in chosen:
            bar.update(note=layer.key)
            diff = _weight(tt, layer, dev) - _weight(tb, layer, dev)
            biggest = float(diff.abs().max()) if diff.numel() else 0.0
            r = conv_rank if (layer.is_conv3 and conv_rank is not None) else rank
            mat = diff.reshape(diff.shape[0], -1)
            del diff
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            del mat
            k = svd.choose_rank(s, r, method, param)
            if k == 0:
                continue  # unchanged layer
            up, down = u[:, :k] * s[:k], vh[:k]
            clamp_quantile(up, down, clamp)
            energy = float((s ** 2).sum())
            item = (LayerResult(layer.key, None, k, energy, float((s[:k] ** 2).sum()) / energy),
                    lora_tensors(layer, up.cpu(), down.cpu(), k, dtype))
            if layer.target.is_text_encoder:
                te_max = max(te_max, biggest)
                te_results.append(item)
            else:
                res.layers.append(item[0])
                res.tensors.update(item[1])
    with_te = te_max > min_diff
    if with_te:
        res.layers[:0] = [r for r, _ in te_results]
        for _, t in te_results:
            res.tensors.update(t)
    elif te_results or any(l.target.is_text_encoder for l in chosen):
        log(f"text encoder unchanged (no difference above min_diff {min_diff:g}): UNet only")
    if not res.layers:
        raise ToolError(f"{Path(tuned).name} does not differ from {Path(base).name} in any extracted layer")
    conv = sorted({l.rank for l in res.layers if layout.get(l.key).is_conv3})
    lin = sorted({l.rank for l in res.layers if not layout.get(l.key).is_conv3})
    note = (f"extracted by lora-workshop from {Path(tuned).name} against {Path(base).name}: rank {rank}"
            + (f", conv rank {conv_rank}" if conv_rank else "") + (f", {method}={param:g}" if method else "")
            + f", clamp quantile {clamp:g} ({100 * res.kept:.2f}% energy kept)")
    fam = layout.family
    meta = {"ss_base_model_version": base_model_version(fam, "epsilon"), "ss_v2": str(fam == "sd2"),
            "ss_sd_model_name": Path(base).stem, "ss_output_name": out.stem, "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture(fam, "epsilon"), "modelspec.title": out.stem}
    meta = network_meta(meta, lin or conv, conv, method is not None, note)
    save_safetensors(res.tensors, out, meta, overwrite=force)
    lines = report_lines(res, per_layer)
    for line in lines:
        log(line)
    return ExtractResult(out, res, lines, with_te)
