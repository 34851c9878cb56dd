"""``merge``: several LoRAs with weights into one LoRA, exactly (ranks side by side) or by SVD.

Each input is ``FILE[:te[:unet[:dyn]]]`` or ``FILE:te=0.5:unet=1``, the numbers of the prompt's
``<lora:name:...>`` token.  Per-block weights (``lbw=``) are LoRA Block Weight's, as in prompts.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import blockweights
from ..fileio import TensorFile, save_safetensors
from ..network import Network, load_network
from ..params import LoraRequest, ParamError, parse_args
from . import deltas, layout as layouts, lowrank, svd
from .common import FAMILY_KEYS, NeedsBaseError, ToolError, check_output, network_meta
from .deltas import LayerWeight
from .layout import Layout


@dataclass(frozen=True)
class Spec:
    path: Path
    request: LoraRequest
    extra: tuple[tuple[str, str], ...] = ()   # named values beyond te/unet/dyn (e.g. lbw=)

    def describe(self) -> str:
        r = self.request
        w = f"{r.te:g}" if r.te == r.unet else f"te {r.te:g} / unet {r.unet:g}"
        return f"{self.path.name} x{w}" + (f" dyn {r.dyn}" if r.dyn else "") + \
            "".join(f" {k}={v}" for k, v in self.extra)


def parse_spec(text: str) -> Spec:
    """``path[:te[:unet[:dyn]]]`` with ``key=value`` items; the path may itself hold colons (C:\\...)."""
    parts = text.split(":")
    items: list[str] = []
    while len(parts) > 1 and _is_weight(parts[-1]):
        items.insert(0, parts.pop())
    path = ":".join(parts)
    positional, named, extra = [path], {}, []
    for item in items:
        k, sep, v = item.partition("=")
        if sep and k.strip() in ("te", "unet", "dyn"):
            named[k.strip()] = v.strip()
        elif sep:
            extra.append((k.strip(), v.strip()))
        else:
            positional.append(item)
    try:
        req = parse_args(positional, named)
    except ParamError as e:
        raise ToolError(f"{text}: {e}") from None
    return Spec(Path(path), req, tuple(extra))


def _is_weight(item: str) -> bool:
    if "=" in item:
        return True
    try:
        float(item)
        return True
    except ValueError:
        return item == ""


def layer_weight(spec: Spec) -> LayerWeight:
    """The multiplier of each layer for ``spec``: te/unet, times LBW's block weight with ``lbw=``."""
    extra = dict(spec.extra)
    unknown = sorted(set(extra) - {"lbw"})
    if unknown:
        raise ToolError(f"{spec.path.name}: unknown weight item {unknown[0]}= (te, unet, dyn, lbw)")
    te, unet = spec.request.te, spec.request.unet
    if "lbw" not in extra:
        return lambda key, is_te: te if is_te else unet
    try:
        blocks = blockweights.parse_block_weights(extra["lbw"])
    except ValueError as e:
        raise ToolError(f"{spec.path.name}: lbw={extra['lbw']}: {e}") from None
    return lambda key, is_te: (te if is_te else unet) * blocks.weight(blockweights.target_block([key]))


@dataclass
class MergeResult:
    path: Path
    result: lowrank.LowRankResult
    lines: list[str]


def merge(specs: list[Spec | str], out: str | os.PathLike, *, rank: Optional[int] = None,
          conv_rank: Optional[int] = None, method: Optional[str] = None, param: Optional[float] = None,
          min_norm: float = 0.0, base: str | os.PathLike | None = None, family: Optional[str] = None,
          layout: Layout | None = None, dtype: torch.dtype | None = torch.float16, force: bool = False,
          device: Optional[str] = None, log: Callable[[str], None] = print, per_layer: bool = False) -> MergeResult:
    """``rank=None`` and no ``method``: exact (ranks concatenated); otherwise SVD to that rank."""
    specs = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ToolError("merge needs at least one input LoRA")
    if rank is not None and rank < 1:
        raise ToolError(f"rank must be at least 1, not {rank}")
    if method is not None and (rank is None or param is None or param <= 0):
        raise ToolError(f"{method} needs --rank (the largest rank) and a positive --dynamic-param")
    out = check_output(out, [s.path for s in specs] + ([base] if base else []), force)
    weights = [layer_weight(s) for s in specs]
    nets: list[Network] = [load_network(s.path) for s in specs]
    with contextlib.ExitStack() as stack:
        tf = stack.enter_context(TensorFile(base)) if base else None
        if layout is None:
            layout = layouts.from_checkpoint(tf) if tf else layouts.for_family(deltas.common_family(nets, family))
        groups = deltas.group([(n, w, s.request.dyn) for n, w, s in zip(nets, weights, specs)], layout)
        weighted = deltas.needs_base(groups)
        if weighted and tf is None:
            raise NeedsBaseError(f"{', '.join(weighted)} depend on the base weights; pass --base CKPT")
        res = lowrank.build(groups, rank=rank, conv_rank=conv_rank, method=method, param=param,
                            min_norm=min_norm, base=tf, dtype=dtype, dev=svd.device(device), label="merge")
    if not res.layers:
        raise ToolError("the merge has no non-zero layer")
    how = "exact merge" if rank is None and method is None else \
        f"SVD merge with {method}={param:g} (max rank {rank})" if method else f"SVD merge to rank {rank}"
    note = f"{how} by lora-workshop of " + ", ".join(s.describe() for s in specs) + \
        (f" ({100 * res.kept:.2f}% energy kept)" if rank is not None else "")
    first = nets[0].metadata
    meta = {k: first[k] for k in FAMILY_KEYS if k in first}
    meta.update({"ss_output_name": out.stem, "modelspec.title": out.stem,
                 "modelspec.merged_from": ", ".join(s.path.stem for s in specs),
                 "ss_merged_from": json.dumps([{"file": s.path.name, "te": s.request.te, "unet": s.request.unet,
                                                "dyn": s.request.dyn, **dict(s.extra)} for s in specs])})
    conv = sorted({l.rank for l in res.layers if layout.get(l.key).is_conv3})
    lin = sorted({l.rank for l in res.layers if not layout.get(l.key).is_conv3})
    meta = network_meta(meta, lin or conv, conv, method is not None, note)
    save_safetensors(res.tensors, out, meta, overwrite=force)
    lines = lowrank.report_lines(res, per_layer)
    for line in lines:
        log(line)
    return MergeResult(out, res, lines)
