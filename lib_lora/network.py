"""A LoRA file parsed into adapters, independent of any model."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import families
from .bundled import BundledEmbedding, parse_bundle, split_bundle
from .adapters import Adapter, AdapterError, make_adapter
from .fileio import LoraFileError, load_file
from .keymap import split_key


@dataclass
class Network:
    name: str
    path: Path | None
    metadata: dict[str, str]
    adapters: dict[str, Adapter]          # kohya module key -> adapter
    family: str | None
    unknown_keys: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # modules whose tensors were unusable
    mtime: float = 0.0
    nbytes: int = 0
    embeddings: dict[str, BundledEmbedding] = field(default_factory=dict)  # bundled textual inversions (bundled.py)

    def algorithms(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for a in self.adapters.values():
            out[a.algo] += 1
        return dict(out)

    def ranks(self) -> list[int]:
        return sorted({r for a in self.adapters.values() if (r := a.rank()) is not None})

    def alphas(self) -> list[float]:
        return sorted({a.alpha for a in self.adapters.values() if a.alpha is not None})

    def count(self, component: str) -> int:
        if component == "unet":
            return sum(k.startswith(("lora_unet_", "lora_transformer_")) for k in self.adapters)
        return sum(k.startswith("lora_te") for k in self.adapters)


def parse_state_dict(name: str, sd: dict[str, Tensor], metadata: dict[str, str],
                     path: Path | None = None) -> Network:
    """Group tensors by module and build one adapter per module; read the bundled embeddings."""
    lora_sd, bundle = split_bundle(sd)
    embeddings = parse_bundle(name, bundle, str(path) if path is not None else "")
    dual = dual_text_encoders(lora_sd)
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    for key, tensor in lora_sd.items():
        split = split_key(key, dual)
        if split is None:
            unknown.append(key)
            continue
        module, role = split
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
            raise LoraFileError(f"{name}: tensor {key} is stored as {tensor.layout}/{tensor.device.type} "
                                "(only dense CPU tensors are read)")
        if role == "alpha" and _is_integer_scalar(tensor):
            tensor = tensor.float()  # diffusers' convert_state_dict_to_kohya writes torch.tensor(rank)
        elif not torch.is_floating_point(tensor) and role not in ("on_input",):
            raise LoraFileError(f"{name}: tensor {key} has non-float dtype {tensor.dtype}")
        groups[module][role] = tensor
    _apply_peft_alphas(name, groups, metadata)
    adapters: dict[str, Adapter] = {}
    errors: list[str] = []
    for module, tensors in groups.items():
        if set(tensors) <= {"alpha", "dora_scale"}:
            unknown.extend(f"{module}.{r}" for r in tensors)
            continue
        for role, t in tensors.items():
            if torch.is_floating_point(t) and not _finite(t):
                raise LoraFileError(f"{name}: tensor {module}.{role} contains NaN or Inf values")
        try:
            adapter = make_adapter(module, tensors)
        except AdapterError as e:
            errors.append(str(e))
            continue
        except (RuntimeError, IndexError) as e:  # torch's refusal of shapes validate() let through
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append(f"{module}: tensors do not form an adapter ({reason})")
            continue
        unknown.extend(f"{module}.{r}" for r in sorted(set(tensors) - adapter.known_suffixes()))
        adapters[module] = adapter
    if not adapters and not embeddings:  # a file of embeddings alone is what the built-in reads too
        detail = f" ({errors[0]})" if errors else ""
        raise LoraFileError(f"{name}: no LoRA/LyCORIS tensors recognised in file{detail}")
    shapes = {f"{m}.{r}": tuple(t.shape) for m, ts in groups.items() for r, t in ts.items()}
    family = families.detect_family(metadata, set(adapters), shapes)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    return Network(name, path, metadata, adapters, family, unknown, errors, nbytes=nbytes, embeddings=embeddings)


def dual_text_encoders(keys) -> bool:
    """Whether a file's keys name several text encoders, so that an unnumbered one is the first."""
    return any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoder_3.", "transformer.")) for k in keys)


def _is_integer_scalar(t: Tensor) -> bool:
    return t.numel() == 1 and not torch.is_floating_point(t) and not torch.is_complex(t) and t.dtype != torch.bool


_PEFT_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer"}


def _finite(t: Tensor) -> bool:
    """Finite once in float32, where deltas are computed (float8 has no isfinite of its own)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        t = t.float()
    return bool(torch.isfinite(t).all())


def _peft_alpha(name: str, where: str, value: object) -> float:
    # bool is an int to Python, and float32 (the alpha tensor) overflows long before float64
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not abs(value) <= torch.finfo(torch.float32).max:
        raise LoraFileError(f"{name}: lora_adapter_metadata {where} is {str(value)[:40]!r}, not a usable number")
    return float(value)


def _apply_peft_alphas(name: str, groups: dict[str, dict[str, Tensor]], metadata: dict[str, str]) -> None:
    """diffusers files keep PEFT's lora_alpha (and per-module alpha_pattern) in the header, not as tensors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise LoraFileError(f"{name}: lora_adapter_metadata in the file header is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise LoraFileError(f"{name}: lora_adapter_metadata in the file header is not a JSON object")
    for module, tensors in groups.items():
        if "alpha" in tensors or "lora_down.weight" not in tensors:
            continue
        comp = next((c for p, c in _PEFT_COMPONENTS.items() if module.startswith(p)), None)
        if comp is None or f"{comp}.lora_alpha" not in cfg:
            continue
        alpha = _peft_alpha(name, f"{comp}.lora_alpha", cfg[f"{comp}.lora_alpha"])
        patterns = cfg.get(f"{comp}.alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise LoraFileError(f"{name}: lora_adapter_metadata {comp}.alpha_pattern is not an object")
        for pattern, value in patterns.items():
            if ("_" + module).endswith("_" + pattern.replace(".", "_")):
                alpha = _peft_alpha(name, f"{comp}.alpha_pattern[{pattern!r}]", value)
                break
        tensors["alpha"] = torch.tensor(alpha)


def load_network(path: str | os.PathLike, name: str | None = None) -> Network:
    """Read and parse a file; raises LoraFileError with a one-line reason on bad input."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    mtime = path.stat().st_mtime
    sd, meta = load_file(path)
    net = parse_state_dict(name or path.stem, sd, meta, path)
    net.mtime = mtime
    return net
