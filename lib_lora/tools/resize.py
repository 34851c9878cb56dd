"""``resize``: lower a LoRA's rank by SVD, to a fixed rank or per layer by kohya's dynamic methods.

Any algorithm is accepted; its exact delta on the real layer layout is decomposed, and the
output is a plain kohya LoRA/LoCon with alpha = rank.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fileio import TensorFile, save_safetensors
from ..network import load_network
from . import deltas, layout as layouts, lowrank, svd
from .common import NeedsBaseError, ToolError, check_output, network_meta
from .layout import Layout


@dataclass
class ResizeResult:
    path: Path
    result: lowrank.LowRankResult
    lines: list[str]


def resize(src: str | os.PathLike, out: str | os.PathLike, *, rank: int, conv_rank: Optional[int] = None,
           method: Optional[str] = None, param: Optional[float] = None, min_norm: float = 0.0,
           base: str | os.PathLike | None = None, family: Optional[str] = None, layout: Layout | None = None,
           dtype: torch.dtype | None = torch.float16, force: bool = False, device: Optional[str] = None,
           log: Callable[[str], None] = print, per_layer: bool = True) -> ResizeResult:
    if rank < 1:
        raise ToolError(f"rank must be at least 1, not {rank}")
    if method is not None and (param is None or param <= 0):
        raise ToolError(f"{method} needs a positive --dynamic-param")
    inputs = [src] + ([base] if base else [])
    out = check_output(out, inputs, force)
    net = load_network(src)
    with contextlib.ExitStack() as stack:
        tf = stack.enter_context(TensorFile(base)) if base else None
        if layout is None:
            layout = layouts.from_checkpoint(tf) if tf else \
                layouts.for_family(deltas.common_family([net], family))
        groups = deltas.group([(net, lambda key, te: 1.0, None)], layout)
        weighted = deltas.needs_base(groups)
        if weighted and tf is None:
            raise NeedsBaseError(f"{net.name}: {', '.join(weighted)} depends on the base weights; pass --base CKPT")
        res = lowrank.build(groups, rank=rank, conv_rank=conv_rank, method=method, param=param, min_norm=min_norm,
                            base=tf, dtype=dtype, dev=svd.device(device), label="resize")
    if not res.layers:
        raise ToolError(f"{net.name}: no layer left to write (all dropped)")
    how = f"dynamic resize with {method}={param:g} (max rank {rank})" if method else f"resized to rank {rank}"
    if conv_rank is not None and not method:
        how += f", conv rank {conv_rank}"
    old = net.metadata.get("ss_network_dim") or ",".join(map(str, net.ranks())) or "?"
    note = f"{how} from {old} by lora-workshop ({100 * res.kept:.2f}% energy kept)"
    conv = sorted({l.rank for l in res.layers if layout.get(l.key).is_conv3})
    lin = sorted({l.rank for l in res.layers if not layout.get(l.key).is_conv3})
    meta = network_meta(net.metadata, lin or conv, conv, method is not None, note)
    save_safetensors(res.tensors, out, meta, overwrite=force)
    lines = lowrank.report_lines(res, per_layer)
    for line in lines:
        log(line)
    return ResizeResult(out, res, lines)
