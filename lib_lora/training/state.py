"""Training state for exact resume: one safetensors file (tensors) with a JSON header (the rest).

Our own files are read back with the same non-executing loader as any LoRA — no pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fileio import LoraFileError, load_safetensors, save_safetensors

STATE_FORMAT = "lora-workshop-train-state/1"


def _split(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace tensors inside a nested structure by references, collecting them in ``tensors``."""
    if isinstance(obj, Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in training state")


def _join(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict[str, Any], overwrite: bool = True) -> Path:
    tensors: dict[str, Tensor] = {}
    tree = _split(state, "s", tensors)
    if not tensors:
        tensors["s.empty"] = torch.zeros(0)
    return save_safetensors(tensors, path, {"format": STATE_FORMAT, "state": json.dumps(tree)}, overwrite=overwrite)


def load_state(path: Path) -> dict[str, Any]:
    tensors, meta = load_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise LoraFileError(f"{Path(path).name}: not a LoRA Workshop training state file")
    return _join(json.loads(meta["state"]), tensors)
