"""A training run's resume state: the one module that knows its schema.

One ``NAME[-step00001234|-000004]-state.safetensors`` beside each LoRA a run saves (``state_path``,
kohya's state folder names; older releases wrote ``NAME.state.safetensors``, still resumable): the tensors
(network, optimiser) in the safetensors body, everything else as JSON in its header.  ``save_state``
writes a ``TrainingState``, ``load_state`` reads it back for an exact resume, and
``read_state_header`` reads what a request and the output checks need without loading tensors.
Our own files are read back with the same non-executing loader as any LoRA — no pickle.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fileio import (LEGACY_TRAINING_STATE_SUFFIX, TRAINING_STATE_FORMAT as STATE_FORMAT, TRAINING_STATE_SUFFIX,
                      LoraFileError, load_safetensors, read_header, save_safetensors)
from .epochs import Position


@dataclass
class TrainingState:
    """Everything an exact resume needs, as saved after optimiser step ``step``."""
    step: int
    position: Position                 # where the epoch order stands after that step
    losses: list[float]
    started: float                     # the run's start (ss_training_started_at)
    session: str                       # the run's ss_session_id: its own files may be replaced
    fingerprint: str                   # Dataset.fingerprint(): the epoch plan must be the same
    config: dict[str, Any]             # the TrainConfig as JSON, for resuming a request
    network: dict[str, Tensor]         # kohya keys, fp32
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Tensor] | None = None  # the LoRA's moving average (ema.py), kohya keys, fp32; None: not kept
    scaler: dict[str, Any] | None = None  # the loss scale's state (half_weights.scaler_state); None: none
    pivotal: dict[str, Any] | None = None  # the pivotal word's vectors and optimiser (PivotalWord.state_dict)


@dataclass(frozen=True)
class StateHeader:
    """What the header alone tells: enough to resume a request and to know a run's own files."""
    step: int
    session: str
    config: dict[str, Any]


def state_path(lora_path: Path) -> Path:
    """The state file saved beside ``lora_path``: kohya's state folder name for that save, as one file
    (``NAME-step00001234.safetensors`` -> ``NAME-step00001234-state.safetensors``)."""
    return lora_path.with_name(lora_path.stem + TRAINING_STATE_SUFFIX)


def is_state_file(path: str | Path) -> bool:
    """Named like a state file, new (``-state``) or older (``.state``); only its header says it is one."""
    return Path(path).name.endswith((TRAINING_STATE_SUFFIX, LEGACY_TRAINING_STATE_SUFFIX))


def list_state_files(folder: Path) -> list[str]:
    """Training state files in the LoRA folder (relative names, either naming), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.rglob("*.safetensors") if is_state_file(p) and p.is_file()]
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.relative_to(folder).as_posix() for p in files]


def config_record(cfg: Any) -> dict[str, Any]:
    """A TrainConfig as the JSON a state keeps (paths as strings, tuples as lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


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


def save_state(path: Path, state: TrainingState, overwrite: bool = True) -> Path:
    record = {"step": state.step, "position": state.position.to_dict(), "losses": state.losses,
              "started": state.started, "session": state.session, "fingerprint": state.fingerprint,
              "config": state.config, "network": state.network, "optimizer": state.optimizer,
              "scheduler": state.scheduler}
    if state.ema is not None:
        record["ema"] = state.ema
    if state.scaler is not None:
        record["scaler"] = state.scaler
    if state.pivotal is not None:
        record["pivotal"] = state.pivotal
    tensors: dict[str, Tensor] = {}
    tree = _split(record, "s", tensors)
    if not tensors:
        tensors["s.empty"] = torch.zeros(0)
    return save_safetensors(tensors, path, {"format": STATE_FORMAT, "state": json.dumps(tree)}, overwrite=overwrite)


def load_state(path: Path) -> TrainingState:
    tensors, meta = load_safetensors(path)
    record = _parse(path, meta, tensors)
    try:
        return TrainingState(
            step=int(record["step"]), position=Position.from_dict(record["position"]),
            losses=list(record["losses"]), started=record["started"], session=str(record["session"]),
            fingerprint=record["fingerprint"], config=record["config"], network=record["network"],
            optimizer=record["optimizer"], scheduler=record["scheduler"],
            ema=record.get("ema"), scaler=record.get("scaler"), pivotal=record.get("pivotal"))
    except (KeyError, TypeError, ValueError):
        raise LoraFileError(f"{Path(path).name}: damaged training state") from None


# what a header alone can tell (no tensors)
_HEADER_KEYS = ("step", "session", "config")


def read_state_header(path: Path) -> StateHeader:
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
    if not isinstance(out.get("step"), int) or out.get("session") is None:
        raise LoraFileError(f"{Path(path).name}: damaged training state header")
    return StateHeader(out["step"], str(out["session"]), out["config"])


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
