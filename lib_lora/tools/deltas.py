"""Exact per-layer deltas of any adapter, matched against a model layout.

Weight-independent algorithms (LoRA, LoHa, LoKr, Full) need only the layer's shape; DoRA, OFT/BOFT,
GLoRA and IA3 change the weight in proportion to itself, so their delta needs the base weight, read
from a checkpoint (``--base``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import Tensor

from ..adapters import Adapter, dora
from ..adapters.base import delta_tensor
from ..adapters.lora import LoRA
from ..fileio import TensorFile
from ..merging import Contribution
from ..network import Network
from .common import FamilyMismatchError, NeedsBaseError, ToolError, UnknownKeysError
from .layout import Layer, Layout

# (module key, is text encoder) -> multiplier; the LBW hook of merge/bake supplies per-block values
LayerWeight = Callable[[str, bool], float]


def check_family(net: Network, family: str) -> None:
    if net.family and net.family != family:
        from .. import families
        raise FamilyMismatchError(f"{net.name} is an {families.display(net.family)} LoRA, the model is "
                                  f"{families.display(family)}")


def bind(net: Network, layout: Layout) -> list[tuple[Layer, Adapter]]:
    """Every adapter of ``net`` with its layer; unknown tensors or layers are refused by name."""
    check_family(net, layout.family)
    if net.unknown_keys:
        raise UnknownKeysError(f"{net.name}: {len(net.unknown_keys)} tensors no adapter understands "
                               f"(e.g. {net.unknown_keys[0]})")
    if net.errors:
        raise UnknownKeysError(f"{net.name}: {len(net.errors)} unusable modules ({net.errors[0]})")
    if net.embeddings:  # the tools would drop them from what they write
        raise UnknownKeysError(f"{net.name}: bundled textual-inversion embeddings ({', '.join(net.embeddings)}), "
                               "which the tools do not carry over")
    pairs, missing = [], []
    for key, adapter in net.adapters.items():
        layer = layout.get(key)
        if layer is None:
            missing.append(key)
        else:
            pairs.append((layer, adapter))
    if missing:
        raise UnknownKeysError(f"{net.name}: {len(missing)} of {len(net.adapters)} layers are not in the "
                               f"{layout.family} model (e.g. {missing[0]})")
    return pairs


def group(networks: list[tuple[Network, LayerWeight, Optional[int]]], layout: Layout) -> dict[Layer, list[Contribution]]:
    """Contributions per layer, in layout order, for networks with their weights."""
    by_layer: dict[Layer, list[Contribution]] = defaultdict(list)
    for net, weight, dyn in networks:
        for layer, adapter in bind(net, layout):
            m = float(weight(layer.key, layer.target.is_text_encoder))
            if m != 0:
                by_layer[layer].append(Contribution(layer.target, adapter, m, dyn, net.name))
    order = {id(l): i for i, l in enumerate(layout.layers)}
    return dict(sorted(by_layer.items(), key=lambda kv: order[id(kv[0])]))


def needs_base(groups: dict[Layer, list[Contribution]]) -> list[str]:
    return sorted({f"{c.network} ({c.adapter.algo}{'+DoRA' if c.adapter.dora_scale is not None else ''})"
                   for cs in groups.values() for c in cs if c.adapter.needs_weight})


def lora_factors(c: Contribution, layer: Layer) -> tuple[Tensor, Tensor] | None:
    """(A [out, r], B [r, in*k*k]) with A @ B the contribution, for plain LoRA/LoCon; else None."""
    a = c.adapter
    if not isinstance(a, LoRA) or a.dora_scale is not None or "lora_mid.weight" in a.tensors:
        return None
    down, up, _, scale = a._factors(c.dyn, "cpu")
    if down.dim() > 2 and len(layer.shape) > 2 and tuple(down.shape[1:]) != tuple(layer.shape[1:]):
        return None
    if up.shape[0] != layer.shape[0] or down.flatten(1).shape[1] != _cols(layer.shape):
        raise UnknownKeysError(f"{a.name}: shape {(up.shape[0], *down.shape[1:])} does not fit the layer "
                               f"{layer.shape}")
    return up.flatten(1) * (scale * c.multiplier), down.flatten(1)


def _cols(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def delta(c: Contribution, layer: Layer, base: Tensor | None, dev: torch.device) -> Tensor:
    """The contribution's exact weight delta, float32, shaped like the layer."""
    a = c.adapter
    if a.needs_weight and base is None:
        raise NeedsBaseError(f"{c.network}: {a.algo}{' with DoRA' if a.dora_scale is not None else ''} changes "
                             f"{a.name} in proportion to the base weight; pass --base CKPT")
    return delta_tensor(a, layer.shape, c.multiplier, original=base, dyn=c.dyn, dora=dora.strategy(dora.DEFAULT),
                        device=dev)


def base_weight(tf: TensorFile | None, layer: Layer) -> Tensor | None:
    if tf is None or layer.file_key is None:
        return None
    w = tf.get(layer.file_key)
    return w[layer.target.rows] if layer.target.rows is not None else w


def representable(layer: Layer) -> bool:
    """A plain LoRA holds deltas of 2-D+ weights; norms and biases it cannot."""
    return len(layer.shape) >= 2


def common_family(nets: list[Network], given: str | None = None) -> str:
    """The one family all inputs are for (``given`` when they do not say)."""
    from .. import families

    fams = {n.family for n in nets if n.family} | ({given} if given else set())
    if len(fams) > 1:
        raise FamilyMismatchError("inputs are for different families: " + ", ".join(
            f"{n.name} {families.display(n.family)}" for n in nets) + (f"; --family {given}" if given else ""))
    if not fams:
        raise ToolError("cannot tell the model family of the input(s); pass --family sd1|sd2|sdxl")
    return fams.pop()
