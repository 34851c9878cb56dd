"""The value checks behind the option schema (options.py): one rule and one reason for every surface."""
from __future__ import annotations

import importlib.util
import math
import re
from typing import Any


class OptionError(ValueError):
    """One option's value is not usable; ``option`` is the field name."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message


# name (lower case) -> (pip name, module, class); AdamW is torch's own
OPTIMIZERS: dict[str, tuple[str, str, str] | None] = {
    "adamw": None,
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
    "lion": ("lion-pytorch", "lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
}
OPTIMIZER_NAMES = ["AdamW", "AdamW8bit", "Lion", "Prodigy"]
# sd-scripts' --sample_sampler choices
KOHYA_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                  "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


CLIP_SKIP_MAX = 12  # the WebUI's Clip skip setting goes to 12, the layers of SD1's text encoder


def clip_skip_for(family: str, clip_skip: int | None) -> tuple[int | None, str | None]:
    """The clip skip a host encodes captions with for ``family``, and a note when that is not the
    one asked for: SDXL's text encoders have fixed layers, and sd-scripts ignores clip_skip for
    SDXL (with a warning) while still recording it as ss_clip_skip; so does this trainer."""
    if family == "sdxl" and clip_skip is not None:
        return None, (f"clip_skip {clip_skip} is ignored for SDXL, as sd-scripts ignores it: SDXL's text encoders "
                      "use their fixed layers (ss_clip_skip still records it)")
    return clip_skip, None


_FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def check_v2(family: str, v2: bool) -> None:
    """OptionError for a kohya ``v2`` that contradicts the checkpoint's family (read from its weights);
    a host calls it before it touches the model, and ``model_notes`` again."""
    if v2 and family != "sd2":
        raise OptionError("v2", f"says SD2, but the checkpoint is {_FAMILY_NAMES.get(family, family)} (detected "
                                "from its weights): leave v2 out")


def model_notes(family: str, prediction: str, v2: bool, v_parameterization: bool | None) -> list[str]:
    """The lines a run logs about kohya's ``v2`` / ``v_parameterization`` for the loaded checkpoint.

    sd-scripts cannot tell SD2 from SD1 and needs ``--v2``; here the family is read from the
    weights, so ``v2`` only confirms it, and an OptionError refuses a ``v2`` that contradicts
    them (sd-scripts also refuses v2 for SDXL).  ``v_parameterization`` is honoured as given, as
    sd-scripts honours it, with a line when it differs from what the checkpoint predicts."""
    name = _FAMILY_NAMES.get(family, family)
    notes = []
    check_v2(family, v2)
    if v2:
        notes.append("v2: the checkpoint is SD2 (detected from its weights; --v2 only confirms it)")
    if v_parameterization is not None and ("v" if v_parameterization else "epsilon") != prediction:
        asked = "v" if v_parameterization else "epsilon (noise)"
        notes.append(f"warning: v_parameterization {str(v_parameterization).lower()}: training the {name} "
                     f"checkpoint to predict {asked}, as asked, though it predicts "
                     f"{'v' if prediction == 'v' else 'epsilon (noise)'}")
    return notes


def timestep_range(min_timestep: int | None, max_timestep: int | None, schedule: int) -> tuple[int, int, str | None]:
    """The training timesteps ``[lo, hi)`` for a noise schedule of ``schedule`` steps, and a warning line
    when ``max_timestep`` lies beyond it (the draw is capped at the schedule's end).  A ``min_timestep``
    at or beyond the schedule's end leaves nothing to draw: OptionError."""
    lo = min_timestep or 0
    if lo >= schedule:
        raise OptionError("min_timestep", f"{lo} is beyond this model's noise schedule of {schedule} timesteps "
                                          f"(0 to {schedule - 1}): choose one below {schedule}")
    if max_timestep is None or max_timestep <= schedule:
        return lo, max_timestep or schedule, None
    return lo, schedule, (f"warning: max_timestep {max_timestep} is beyond this model's noise schedule of {schedule} "
                          f"timesteps: training timesteps are drawn from [{lo}, {schedule}) instead")


def check_optimizer(name: Any) -> tuple[str, str, str] | None:
    """The package entry for ``name``; OptionError if unknown or its package is not installed."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise OptionError("optimizer", f"unknown optimizer {name!r}: choose {', '.join(OPTIMIZER_NAMES)}")
    entry = OPTIMIZERS[name.lower()]
    if entry is not None and importlib.util.find_spec(entry[1].split(".")[0]) is None:
        raise OptionError("optimizer", f"{name} needs the '{entry[0]}' package; install it yourself "
                                       f"(pip install {entry[0]}) or choose AdamW")
    return entry


def check_logging(log_with: Any, logging_dir: Any) -> None:
    """kohya's ``log_with``/``logging_dir``: TensorBoard only, into a folder, with its package installed."""
    if log_with not in (None, "tensorboard"):
        raise OptionError("log_with", f"{log_with!r}: only tensorboard is supported here (wandb is not)")
    if log_with and not logging_dir:
        raise OptionError("logging_dir", "is required with log_with tensorboard: the folder the event files go to")
    if (log_with or logging_dir) and importlib.util.find_spec("tensorboard") is None:
        raise OptionError("log_with", "TensorBoard logging needs the 'tensorboard' package; install it yourself "
                                      "(pip install tensorboard)")


def check_pivotal_word(word: Any) -> None:
    """One word of letters, digits, ``-`` and ``_`` (or "" for off): an embedding's name that a prompt can hold
    as it is, and that a bundled embedding's key (``bundle_emb.WORD.…``) can carry."""
    if not isinstance(word, str) or (word and not re.fullmatch(r"[\w-]+", word)):
        raise OptionError("pivotal_word", f"{word!r}: one word of letters, digits, - and _ (empty: off)")


def pivotal_caption_problem(word: str, captions: list[str]) -> str | None:
    """Why ``word`` cannot be trained as the pivotal word on ``captions`` (the training images'), or None: it
    must stand, as a word, in one of them, or its embeddings would never train."""
    # CLIP lower-cases a prompt and cuts letters from digits and punctuation before its BPE: "zkx-style" and
    # "zkx2" hold the word's tokens, "zkxs" need not
    pattern = re.compile(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", re.IGNORECASE)
    if any(pattern.search(c) for c in captions):
        return None
    return (f"pivotal_word: {word!r} is in none of the training images' captions (or folder names): its embeddings "
            "would never train")


def integer(option: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f"at least {minimum}" + (f" and at most {maximum}" if maximum is not None else "")
        raise OptionError(option, f"must be a whole number {bound} (got {value!r})")


def number(option: str, value: Any, minimum: float = 0.0, above: bool = False, maximum: float | None = None) -> None:
    """A finite number >= ``minimum`` (> with ``above``), and <= ``maximum`` when given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > minimum if above else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"{'above' if above else 'at least'} {minimum:g}" + (f" and at most {maximum:g}" if maximum is not None else "")
        raise OptionError(option, f"must be a finite number {bound} (got {value!r})")
