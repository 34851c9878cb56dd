"""Random kohya-format LoRA state dicts for a ModelMap (test support)."""
from __future__ import annotations

import torch

from lib_lora.modelmap import ModelMap
from lib_lora.network import Network
from lib_lora.params import LoraRequest
from lib_lora.patcher import Activation


def kohya_lora(mm: ModelMap, rank: int = 4, alpha: float | None = 2.0, seed: int = 0, convs: bool = False,
               only: tuple[str, ...] | None = None, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """LoRA (and LoCon for convs) on linear/conv targets, optionally filtered by key substrings."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for t in mm.targets:
        w = t.weight()
        if w.dim() < 2 or "embedding" in t.key:
            continue
        if only is not None and not any(s in t.key for s in only):
            continue
        if w.dim() == 4 and w.shape[2:] != (1, 1) and not convs:
            continue
        if w.dim() == 4 and w.shape[2:] != (1, 1):
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        elif w.dim() == 4:
            down = torch.randn(rank, w.shape[1], 1, 1, generator=g)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, w.shape[1], generator=g)
            up = torch.randn(w.shape[0], rank, generator=g)
        sd[f"{t.key}.lora_down.weight"] = down * scale
        sd[f"{t.key}.lora_up.weight"] = up * scale
        if alpha is not None:
            sd[f"{t.key}.alpha"] = torch.tensor(alpha)
    return sd


def snapshot(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality of two snapshots (NaN- and fp8-safe)."""
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def activation(network: Network, *weights, **kwargs) -> Activation:
    """What the runtime hands the patcher for ``network`` at these ``LoraRequest`` weights
    (positional: te, unet, dyn; keywords: blocks, elements, start, stop)."""
    return Activation(network, LoraRequest(network.name, *weights, **kwargs))


def deltas(adapter, weight: torch.Tensor, bias: torch.Tensor | None, multiplier: float, dora=None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight delta, bias delta or None) at ``multiplier`` against the original ``weight``, through the
    production verb (``Adapter.add_delta_`` into zeros, as the bypass hooks take them)."""
    from lib_lora.adapters import AdapterError
    from lib_lora.adapters.base import delta_tensor

    dw = delta_tensor(adapter, weight.shape, multiplier, original=weight, dora=dora, device=weight.device)
    if not adapter.has_bias:
        return dw, None
    if bias is None:
        raise AdapterError(f"{adapter.name}: file has a bias delta but the layer has no bias")
    return dw, delta_tensor(adapter, bias.shape, multiplier, part="bias", device=bias.device)
