"""The files a training run writes, and whether it may write them.

A run writes its final LoRA and intermediate saves under kohya's names
(``NAME-step00001234.safetensors`` every N steps, ``NAME-000004.safetensors`` every N epochs)
and, with ``save_state``, a state file beside each (``state.state_path``: kohya's state folder
names ``NAME-step00001234-state``, ``NAME-000004-state``, ``NAME-state``, plus ``.safetensors``).
All of these names are known before the first step (``planned``), so they are all checked then: an
existing file is replaced only when the user asked to overwrite, or when it belongs to the run being resumed (same
``ss_session_id`` / state session).  Nothing a user made is ever overwritten silently.
"""
from __future__ import annotations

import math
import os
import time
import unicodedata
from pathlib import Path
from typing import Any

from ..fileio import LoraFileError, read_header
from .options import OptionError
from .state import is_state_file, read_state_header, state_path

# temp files an interrupted atomic write can leave (fileio.atomic_path's naming) older than this are ours to sweep
STALE_TEMP_SECONDS = 60.0


_BAD_NAME_CHARS = set('/\\:*?"<>|') | {chr(c) for c in range(32)} | {chr(127)}
# names Windows reserves for devices, also with any extension ("con.txt")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10)),
                     "com¹", "com²", "com³", "lpt¹", "lpt²", "lpt³"}


def check_output_name(name: Any, option: str = "output_name") -> str:
    """A plain file stem (NFC) for the LoRA folder, the same on every operating system.

    Look-alikes are judged by their compatibility form, so a fullwidth '／' or '．．' is
    refused like '/' or '..'.
    """
    if not isinstance(name, str) or not name.strip():
        raise OptionError(option, "is required (the LoRA's file name, without extension)")
    name = unicodedata.normalize("NFC", name.strip())
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    folded = unicodedata.normalize("NFKC", name)
    if ".." in folded or any(c in _BAD_NAME_CHARS for c in folded) or folded.startswith(".") \
            or folded.endswith((".", " ")) or not folded.strip(". "):
        raise OptionError(option, f"{name!r} is not a plain file name: no '/', '\\', '..', ':' or other special "
                                  "characters, and no leading or trailing dot (files are always written to the "
                                  "LoRA folder)")
    if folded.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise OptionError(option, f"{name!r} is a device name on Windows; choose another name")
    if name.lower().endswith((".state", "-state")):
        raise OptionError(option, f"{name!r} must not end in '.state' or '-state' (reserved for training state "
                                  "files)")
    if len(name) > 200:
        raise OptionError(option, "is too long (200 characters at most)")
    return name


def output_path(output_dir: str | Path, name: str, step: int | None = None, epoch: int | None = None) -> Path:
    """The LoRA file of a save: the final one, or kohya's name for a save at ``step`` or after ``epoch``."""
    if epoch is not None:
        stem = f"{name}-{epoch:06d}"
    elif step is not None:
        stem = f"{name}-step{step:08d}"
    else:
        stem = name
    return Path(output_dir) / f"{stem}.safetensors"


def updates_per_epoch(per_epoch: int, accumulation: int) -> int:
    """Optimiser steps in one epoch of ``per_epoch`` batches."""
    return max(1, math.ceil(per_epoch / accumulation))


def saves_due(cfg, step: int, per_epoch: int) -> list[tuple[Path, int]]:
    """(file, epoch number for ss_epoch) of each intermediate save at optimiser step ``step``.

    A step that is due both ways writes both files, as kohya does.  The epoch number is
    kohya's: a step save records the epoch it falls in counted from 0, an epoch save the
    epochs it completes.
    """
    spe = updates_per_epoch(per_epoch, cfg.gradient_accumulation_steps)
    out = []
    if cfg.save_every_n_steps > 0 and step % cfg.save_every_n_steps == 0:
        out.append((output_path(cfg.output_dir, cfg.output_name, step=step), (step - 1) // spe))
    if cfg.save_every_n_epochs > 0 and step % (spe * cfg.save_every_n_epochs) == 0:
        out.append((output_path(cfg.output_dir, cfg.output_name, epoch=step // spe), step // spe))
    return out


def final_epoch(step: int, per_epoch: int, accumulation: int) -> int:
    """ss_epoch of the final file: the epochs the run reached (its number of epochs when it finished)."""
    return math.ceil(step / updates_per_epoch(per_epoch, accumulation))


def planned(cfg, total: int, per_epoch: int) -> list[Path]:
    """Every path a run of ``total`` steps may write (``cfg`` is a TrainConfig)."""
    loras = [path for s in range(1, total) for path, _ in saves_due(cfg, s, per_epoch)]
    loras.append(output_path(cfg.output_dir, cfg.output_name))
    return loras + [state_path(p) for p in loras] if cfg.save_state else loras


def session_of(path: Path) -> str | None:
    """The training session that wrote ``path`` (a LoRA or a state file), or None if unknown."""
    try:
        if is_state_file(path):
            return read_state_header(path).session
        return read_header(path).metadata.get("ss_session_id")
    except (LoraFileError, OSError):
        return None


def may_replace(path: Path, overwrite: bool, session: str | None) -> bool:
    """An existing ``path`` may be replaced: asked for, or written by ``session`` (the run itself)."""
    if overwrite or not path.exists():
        return True
    return session is not None and session_of(path) == session


def check_free(paths: list[Path], overwrite: bool, session: str | None) -> None:
    """Raise FileExistsError naming the files the run would replace without permission."""
    taken = [p for p in paths if not may_replace(p, overwrite, session)]
    if taken:
        more = f" (and {len(taken) - 1} more of the files this run writes)" if len(taken) > 1 else ""
        raise FileExistsError(f"{taken[0]} already exists{more}; this run would overwrite it: choose another "
                              "output name or allow overwriting")


def sweep_temp(paths: list[Path], now: float | None = None) -> list[Path]:
    """Delete the stale temp files an interrupted save of one of ``paths`` left behind."""
    now = time.time() if now is None else now
    removed = []
    for folder in {p.parent for p in paths}:
        names = {p.name for p in paths if p.parent == folder}
        try:
            candidates = list(os.scandir(folder))
        except OSError:
            continue
        for d in candidates:
            if not (d.name.startswith(".") and d.name.endswith(".tmp")) or not d.is_file(follow_symlinks=False):
                continue
            base = d.name[1:].rsplit(".", 2)[0]  # ".NAME.safetensors.abc123.tmp" -> "NAME.safetensors"
            try:
                if base in names and now - d.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(d.path)
                    removed.append(Path(d.path))
            except OSError:
                continue
    return removed
