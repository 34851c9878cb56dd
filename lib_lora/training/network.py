"""The network being trained: LoRA modules attached beside a host model's frozen layers.

Targets follow kohya's defaults: every linear / 1x1 conv inside the UNet's transformer
blocks, CLIP attention and MLP projections, and (LoCon, ``conv_rank > 0``) the resnet
blocks and down/up-samplers.  Layers are never modified: each gets an instance forward that
runs it with its LoRA (lora_layers.py; a forward hook where the layer already has an instance
forward of its own), and only where a layer's weight is consumed inside a fused op (OpenCLIP's
MultiheadAttention) is the weight parametrized as W + delta.  ``detach()`` removes all of
it, leaving the model's Parameters untouched.
"""
from __future__ import annotations

import math
import re
import types
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.lora import LoRAModule
from ..fileio import LoraFileError
from ..modelmap import ModelMap, Target
from . import options
from .lora_layers import lora_forward

_d = options.default

_DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")


@dataclass
class NetworkConfig:
    """Defaults and bounds are declared in options.py."""
    module: str = _d("network.module")          # kohya's network_module: only networks.lora
    rank: int = _d("network.rank")
    alpha: float = _d("network.alpha")
    conv_rank: int = _d("network.conv_rank")    # LoCon for resnets/samplers when > 0
    conv_alpha: float = _d("network.conv_alpha")
    dropout: float = _d("network.dropout")
    train_unet: bool = _d("network.train_unet")
    train_text_encoder: bool = _d("network.train_text_encoder")

    def __post_init__(self) -> None:
        options.check(self, "network")


def unet_block_kind(target: Target) -> str | None:
    """'transformer', 'resnet' or 'sampler' from the layer's diffusers name (whatever the file spelling)."""
    name = next((n for n in (target.key, *target.aliases) if _DIFFUSERS_UNET.match(n)), "")
    if "_attentions_" in name:
        return "transformer"
    if "_resnets_" in name:
        return "resnet"
    if "samplers_" in name:
        return "sampler"
    return None


def select_targets(mm: ModelMap, cfg: NetworkConfig) -> list[tuple[Target, int, float]]:
    """(target, rank, alpha) for every layer kohya's LoRA/LoCon would train."""
    out = []
    for t in mm.targets:
        w = t.weight()
        if w.dim() < 2 or isinstance(t.module, (nn.Embedding, nn.GroupNorm, nn.LayerNorm)):
            continue
        is_conv3 = w.dim() == 4 and tuple(w.shape[2:]) != (1, 1)
        if t.component == "unet":
            if not cfg.train_unet:
                continue
            kind = unet_block_kind(t)
            if kind == "transformer" and not is_conv3:
                out.append((t, cfg.rank, cfg.alpha))
            elif kind in ("resnet", "sampler") and cfg.conv_rank > 0:
                out.append((t, cfg.conv_rank, cfg.conv_alpha) if is_conv3 else (t, cfg.rank, cfg.alpha))
        elif cfg.train_text_encoder and ("_self_attn_" in t.key or "_mlp_fc" in t.key):
            out.append((t, cfg.rank, cfg.alpha))
    return out


class _AddDeltas(nn.Module):
    """Parametrization W -> W + sum of LoRA deltas (on row slices for fused q/k/v)."""

    def __init__(self, parts: list[tuple[slice | None, LoRAModule]]):
        super().__init__()
        self.rows = [r for r, _ in parts]
        self.loras = nn.ModuleList([m for _, m in parts])

    def forward(self, w: Tensor) -> Tensor:
        for rows, lora in zip(self.rows, self.loras):
            d = lora.delta_weight().reshape(-1, *w.shape[1:]).to(w.dtype)
            if rows is None:
                w = w + d
            else:
                idx = torch.arange(rows.start, rows.stop, device=w.device)
                w = w.index_add(0, idx, d)
        return w


class TrainingNetwork(nn.Module):
    # each LoRA'd layer gets one forward (lora_layers.py) rather than a forward hook; the
    # benchmark turns this off to measure what it saves
    one_forward = True

    def __init__(self, mm: ModelMap, cfg: NetworkConfig):
        super().__init__()
        self.mm, self.cfg = mm, cfg
        self.targets: dict[str, Target] = {}
        mods = {}
        for t, rank, alpha in select_targets(mm, cfg):
            w = t.weight()
            mods[t.key.replace(".", "_")] = LoRAModule(t.key, t.module, w.shape, rank, alpha, cfg.dropout)
            self.targets[t.key] = t
        if not mods:
            raise ValueError("nothing to train: no target layers selected (check train_unet / train_text_encoder)")
        self.loras = nn.ModuleDict(mods)
        self._hooks: list = []
        self._forwards: list[nn.Module] = []
        self._parametrized: list[tuple[nn.Module, str, list[str]]] = []

    def lora(self, key: str) -> LoRAModule:
        return self.loras[key.replace(".", "_")]

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        unet, te = [], []
        for key, t in self.targets.items():
            (te if t.is_text_encoder else unet).extend(self.lora(key).parameters())
        return [g for g in ({"params": unet, "lr": unet_lr, "name": "unet"},
                            {"params": te, "lr": te_lr, "name": "text_encoder"}) if g["params"]]

    def place(self) -> None:
        """Every LoRA on its layer's device.  Once, before the optimiser flattens the parameters
        (flat_params): a later move would give them new storage, apart from the buffer it updates."""
        for key, t in self.targets.items():
            self.lora(key).to(device=getattr(t.module, t.weight_name).device)

    def check_placed(self) -> None:
        """RuntimeError when a layer is no longer on its LoRA's device (the LoRA cannot follow it)."""
        for key, t in self.targets.items():
            have, want = self.lora(key).down.weight.device, getattr(t.module, t.weight_name).device
            if have != want:
                raise RuntimeError(f"{key}: the layer moved to {want} while training was suspended, but its LoRA "
                                   f"stays on {have}: moving it would detach it from the optimiser's buffer. "
                                   "Stop the job, keep the model where it is, and resume from a saved state")

    def attach(self) -> None:
        """Give every target its LoRA'd forward (``place`` first); where the weight is read inside a fused op,
        parametrize it instead."""
        fused: dict[tuple[int, str], tuple[nn.Module, list]] = defaultdict(lambda: (None, []))
        for key, t in self.targets.items():
            lora = self.lora(key)
            if t.rows is not None or _weight_read_by_parent(t.module):
                mod, parts = fused[(id(t.module), t.weight_name)]
                parts.append((t.rows, lora))
                fused[(id(t.module), t.weight_name)] = (t.module, parts)
            elif self.one_forward and "forward" not in vars(t.module):
                t.module.forward = types.MethodType(lora_forward(t.module, lora), t.module)
                self._forwards.append(t.module)
            else:  # a layer that already has an instance forward of someone else's keeps it
                self._hooks.append(t.module.register_forward_hook(_bypass(lora)))
        for (_, pname), (module, parts) in fused.items():
            order = list(module._parameters)
            parametrize.register_parametrization(module, pname, _AddDeltas(parts), unsafe=True)
            self._parametrized.append((module, pname, order))

    def detach(self) -> None:
        for m in self._forwards:
            del m.forward   # the class's forward again, exactly
        self._forwards.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, pname, order in self._parametrized:
            # leave_parametrized=False re-registers the original Parameter object itself ...
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
            # ... but at the end; put it back in place so state_dict() order is unchanged too
            params = module._parameters
            module._parameters = {k: params[k] for k in order if k in params} | params
        self._parametrized.clear()

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        out = {}
        for key in self.targets:
            for role, t in self.lora(key).kohya_tensors(dtype).items():
                out[f"{key}.{role}"] = t
        return out

    def load_kohya_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Put back the weights ``kohya_state_dict`` gave (resuming a run); every target must be in ``sd``."""
        for key in self.targets:
            self.lora(key).load_kohya_tensors({role: sd[f"{key}.{role}"]
                                               for role in ("lora_down.weight", "lora_up.weight")})

    def load_weights(self, sd: dict[str, Tensor], source: str) -> list[str]:
        """Start from a kohya LoRA/LoCon file (kohya's ``network_weights``); the layers it lacks are returned.

        Every module in the file must be one this network trains, with the same rank and alpha,
        so that the first step starts from exactly the file's LoRA; anything else is refused
        (``LoraFileError`` naming ``source``) rather than dropped or rescaled.
        """
        roles = ("lora_down.weight", "lora_up.weight", "alpha")
        by_module: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for k, v in sd.items():
            module, _, role = k.partition(".")
            if role not in roles:
                raise LoraFileError(f"{source}: {k!r} is not a LoRA/LoCon weight (kohya's lora_down/lora_up/alpha); "
                                    "only LoRA and LoCon files can be trained on")
            by_module[module][role] = v
        unknown = sorted(set(by_module) - set(self.targets))
        if unknown:
            raise LoraFileError(f"{source}: {len(unknown)} of its layers are not trained with these settings "
                                f"(e.g. {unknown[0]}); match the file's conv_dim and train_unet/train_text_encoder")
        for key, parts in by_module.items():
            lora = self.lora(key)
            if set(parts) - {"alpha"} != {"lora_down.weight", "lora_up.weight"}:
                raise LoraFileError(f"{source}: {key} lacks its lora_down or lora_up weight")
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            if down.shape[0] != lora.rank or down.numel() != lora.down.weight.numel() \
                    or up.numel() != lora.up.weight.numel():
                raise LoraFileError(f"{source}: {key} has rank {down.shape[0]}; these settings give it rank "
                                    f"{lora.rank} (network_dim / conv_dim)")
            alpha = float(parts["alpha"]) if "alpha" in parts else float(lora.rank)  # no alpha: scale 1
            if not math.isclose(alpha, lora.alpha, rel_tol=1e-6):
                raise LoraFileError(f"{source}: {key} has alpha {alpha:g}; these settings give it {lora.alpha:g} "
                                    "(network_alpha / conv_alpha)")
            lora.load_kohya_tensors(parts)
        return sorted(set(self.targets) - set(by_module))


def _weight_read_by_parent(module: nn.Module) -> bool:
    # MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: no forward to hook
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _bypass(lora: LoRAModule):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return lora.add_to(output, args[0])
    return hook
