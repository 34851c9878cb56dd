"""Sample prompts the way kohya-ss/sd-scripts takes them, when they are due, and what the images are called.

A prompt line is the prompt followed by options, each `` --KEY VALUE``: ``--n`` negative prompt,
``--w``/``--h`` size, ``--s`` steps, ``--l`` CFG scale, ``--d`` seed, ``--ss`` sampler (kohya's
names, e.g. ``euler_a``).  Keys are read case-insensitively; a value that does not parse and a key
this trainer does not know are skipped, as sd-scripts skips them.  Every host renders the parsed
prompt with its own pipeline (the WebUI's txt2img, or the checkpoint host's samplers).

A prompt file (``--sample_prompts``) is kohya's: a ``.txt`` with one prompt per line (blank lines
and lines starting with ``#`` skipped), or a ``.json`` list / ``.toml`` ``[prompt]`` table whose
entries use sd-scripts' keys (``prompt``, ``negative_prompt``, ``width``, ``height``,
``sample_steps``, ``scale``, ``seed``, ``sample_sampler``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import KOHYA_SAMPLERS, OptionError
from .outputs import updates_per_epoch

__all__ = ["KOHYA_SAMPLERS", "SamplePrompt", "parse", "read_file", "due", "image_name"]
# what a line without --s / --l renders with
DEFAULT_STEPS, DEFAULT_SCALE = 20, 7.0
# kohya's file keys -> the line option that says the same
_FILE_KEYS = {"negative_prompt": "n", "width": "w", "height": "h", "sample_steps": "s", "scale": "l", "seed": "d",
              "sample_sampler": "ss"}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    scale: float
    seed: int
    sampler: str | None       # as ``--ss`` gave it (kohya's name, or a host's own); None: the run's sampler
    seed_given: bool = False  # ``--d`` was on the line (kohya then adds the seed to the file name)


def parse(line: str, width: int, height: int, seed: int, steps: int = DEFAULT_STEPS,
          scale: float = DEFAULT_SCALE) -> SamplePrompt:
    """One prompt line; the other arguments are what an option left out stands for."""
    head, *parts = line.split(" --")
    values: dict[str, Any] = {"prompt": head.strip(), "negative": "", "width": width, "height": height,
                              "steps": steps, "scale": scale, "seed": seed, "sampler": None}
    given = False
    for part in parts:
        key, _, value = part.strip().partition(" ")
        key, value = key.lower(), value.strip()
        try:
            if key == "n":
                values["negative"] = value
            elif key in ("w", "h", "s", "d"):
                number = int(value)
                if key == "s":
                    number = max(1, min(1000, number))  # sd-scripts' bounds on steps
                values[{"w": "width", "h": "height", "s": "steps", "d": "seed"}[key]] = number
                given = given or key == "d"
            elif key == "l":
                values["scale"] = float(value)
            elif key == "ss" and value:
                values["sampler"] = value
        except ValueError:
            continue  # a malformed option is skipped, as sd-scripts skips it
    return SamplePrompt(**values, seed_given=given)


def _line(entry: Any, where: str) -> str:
    """A .json/.toml entry as the prompt line that says the same."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt", ""), str):
        raise OptionError("sample_prompts", f"{where}: each prompt must be a string or a table with 'prompt'")
    line = entry.get("prompt", "")
    for key, flag in _FILE_KEYS.items():
        if entry.get(key) not in (None, ""):
            line += f" --{flag} {entry[key]}"
    return line


def read_file(path: str | Path) -> list[str]:
    """The prompt lines of a kohya prompt file (.txt, .json or .toml)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise OptionError("sample_prompts", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError("sample_prompts", f"cannot read {path}: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            entries = data if isinstance(data, list) else [data]
        elif suffix == ".toml":
            import tomllib  # Python 3.11+: the command line's Python
            table = tomllib.loads(text).get("prompt", {})
            shared = {k: v for k, v in table.items() if k != "subset"}
            entries = [{**shared, **sub} for sub in table.get("subset", [])]
        else:
            return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    except (ValueError, ImportError) as e:  # json/toml syntax errors are ValueErrors
        raise OptionError("sample_prompts", f"{path}: {e}") from None
    return [_line(e, f"{path} entry {i + 1}") for i, e in enumerate(entries)]


def due(cfg: Any, step: int, per_epoch: int) -> tuple[bool, int | None]:
    """(whether samples are due after optimiser step ``step``, the epoch that just ended or None).

    sd-scripts' rule: every N epochs replaces every N steps; step 0 is ``sample_at_first``, which
    counts as epoch 0.  ``per_epoch`` is the batches of one epoch.
    """
    if not cfg.sample_prompts:
        return False, None
    if step == 0:
        return bool(cfg.sample_at_first), 0
    if cfg.sample_every_n_epochs:
        spe = updates_per_epoch(per_epoch, cfg.gradient_accumulation_steps)
        return step % (spe * cfg.sample_every_n_epochs) == 0, step // spe
    return bool(cfg.sample_every_n_steps) and step % cfg.sample_every_n_steps == 0, None


def image_name(output_name: str, index: int, step: int, epoch: int | None, seed: int | None,
               when: float | None = None) -> str:
    """sd-scripts' sample file name: ``NAME_000120_00_20240501123000.png`` at a step,
    ``NAME_e000004_…`` after an epoch, with ``_SEED`` at the end when the line gave ``--d``."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(when))
    return f"{output_name}_{number}_{index:02d}_{stamp}{'' if seed is None else f'_{seed}'}.png"
