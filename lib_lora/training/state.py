"""Training state for exact resume: one safetensors file (tensors) with a JSON header (the rest).

Our own files are read back with the same non-executing loader as any LoRA — no pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fileio import LoraFileError, load_safetensors, read_header, save_safetensors
from ..library import TRAINING_STATE_FORMAT as STATE_FORMAT


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
    return _parse(path, meta, tensors)


# what a header alone can tell (no tensors): enough to resume a request and to know a run's own files
_HEADER_KEYS = ("step", "session", "config")


def read_state_header(path: Path) -> dict[str, Any]:
    """``step``, ``session`` and ``config`` of a state file, from its header only.

    A crafted or damaged file is refused with ``LoraFileError`` naming it.
    """
    meta = read_header(path).metadata
    tree = _tree(path, meta)
    try:
        pairs = {k: v for k, v in tree["__dict__"] if k in _HEADER_KEYS}
        out = {k: _join(v, {}) for k, v in pairs.items()}
    except (KeyError, TypeError, ValueError, RecursionError):
        raise LoraFileError(f"{Path(path).name}: damaged training state header") from None
    if not isinstance(out.get("config"), dict):
        raise LoraFileError(f"{Path(path).name}: the training state holds no training configuration")
    return out


def _tree(path: Path, meta: dict[str, str]) -> Any:
    if meta.get("format") != STATE_FORMAT:
        raise LoraFileError(f"{Path(path).name}: not a LoRA Workshop training state file")
    try:
        tree = json.loads(meta["state"])
    except (KeyError, ValueError, RecursionError):
        raise LoraFileError(f"{Path(path).name}: the training state header is missing or not JSON") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("__dict__"), list):
        raise LoraFileError(f"{Path(path).name}: the training state header is not a state record")
    return tree


def _parse(path: Path, meta: dict[str, str], tensors: dict[str, Tensor]) -> dict[str, Any]:
    tree = _tree(path, meta)
    try:
        state = _join(tree, tensors)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise LoraFileError(f"{Path(path).name}: damaged training state") from None
    if not isinstance(state, dict):
        raise LoraFileError(f"{Path(path).name}: the training state is not a state record")
    return state
