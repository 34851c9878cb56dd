"""The ``train`` command's arguments, generated from the option schema (options.py), and its request.

Each option's flag is accepted with hyphens or underscores (``--network-dim``, ``--network_dim``),
and so is its name in kohya's sd-scripts (``--train_batch_size``, ``--optimizer_type``), so a
``train_network.py`` command line works as it is.  kohya's ``--network_args "conv_dim=8" …`` and
``--optimizer_args "weight_decay=0.1" …`` are read into the options they name.  ``--help`` lists
the options in the tab's sections, each with its help line and its default.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

from . import sample_prompts
from .options import AUTO_ON_OFF, GROUPS, OPTIONS, REQUIRED, Option, OptionError

IO_GROUP = "Input and output"
_HELP_GROUPS = [IO_GROUP] + [g for g, _ in GROUPS]
# kohya's --network_args key -> what it sets; "algo" names the LyCORIS kind networks.lora trains
_ALGOS = ("lora", "locon")
# options the command line takes from kohya's own key=value lists or files
_NOT_FLAGS = ("network_args", "optimizer_args", "file")


def spellings(name: str) -> list[str]:
    """``--a-b`` and ``--a_b`` for a flag or a kohya name."""
    bare = name.lstrip("-")
    return list(dict.fromkeys([f"--{bare.replace('_', '-')}", f"--{bare.replace('-', '_')}"]))


def kohya_flag(o: Option) -> bool:
    """Whether kohya's name for ``o`` is a train_network.py flag of its own."""
    return bool(o.kohya) and o.kohya_note not in _NOT_FLAGS


def _shown(o: Option) -> str:
    d = o.default
    if d is REQUIRED:
        return "required"
    if o.flag_action == "store_false":
        return "off"  # the flag is not given: the option keeps its default, on
    if o.type == bool | None and not o.flag_action:
        return next(k for k, v in AUTO_ON_OFF.items() if v is d)
    if isinstance(d, bool):
        return "on" if d else "off"
    if d is None or d == [] or d == {}:
        return "unset"
    return f'"{d}"' if isinstance(d, str) and not d.strip() or d == "," else str(d)


def _help(o: Option, text: str | None = None) -> str:
    text = text or o.help or o.label.lower()
    if not any(s in text for s in ("(default", "by default", "(required")):
        text += f" (default: {_shown(o)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _value_kw(o: Option) -> dict[str, Any]:
    """type / choices / metavar of an option that takes a value."""
    kw: dict[str, Any] = {"default": o.default}
    if o.type == bool | None:
        kw["default"] = next(k for k, v in AUTO_ON_OFF.items() if v is o.default)
    else:
        kw["type"] = {int: int, float: float, int | None: int, float | None: float}.get(o.type, str)
    choices = o.cli_choices if o.cli_choices is not None else o.choices
    if choices:
        kw["choices"] = list(choices)
    else:
        kw["metavar"] = (o.flag or o.kohya or o.name).lstrip("-").upper().replace("-", "_")
    return kw


def add_train_arguments(sp: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's arguments: the schema's options in the tab's sections."""
    groups = {title: sp.add_argument_group(title) for title in _HELP_GROUPS}
    io = groups[IO_GROUP]
    io.add_argument("--base", "--pretrained_model_name_or_path", "--pretrained-model-name-or-path", dest="base",
                    required=True, help="single-file .safetensors checkpoint (a .yaml beside it is read) (required)")
    io.add_argument("--out", help="output NAME.safetensors path (required, or --output_dir and --output_name)")
    io.add_argument("--resume", help="a NAME-state.safetensors file written by --save-state (default: unset)")
    io.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    for o in OPTIONS:
        group = groups.get(o.group) or groups["Advanced"]
        if o.flag == "dataset":  # the positional folder, or kohya's --train_data_dir
            group.add_argument("dataset", nargs="?", metavar="DATASET",
                               help=_help(o, f"{o.help} (required, or --{o.kohya})"))
            group.add_argument(*spellings(o.kohya), dest="train_data_dir", metavar="DIR",
                               help="the dataset folder, as kohya names it (required, or DATASET)")
            continue
        if o.kohya_note == "file":  # kohya's flag names a file that holds the option's value
            group.add_argument(*spellings(o.kohya), dest=f"{o.name}_file", metavar="FILE", help=_help(o))
            continue
        names = spellings(o.flag) if o.flag else []
        kohya = spellings(o.kohya) if kohya_flag(o) else []
        if not names and not kohya:
            continue
        if o.key in ("output_name", "output_dir"):  # with --out as the alternative: unset means not given
            group.add_argument(*kohya, dest=o.name, default=None, help=_help(o, o.help + " (default: from --out)"))
            continue
        if not names:  # kohya's name only: its action (store_true for its switches)
            if o.type is bool:
                group.add_argument(*kohya, dest=o.name, action="store_true", default=o.default, help=_help(o))
            else:
                group.add_argument(*kohya, dest=o.name, help=_help(o), **_value_kw(o))
            continue
        if o.flag_action == "store_false" and o.kohya_note != "inverted" and kohya:
            # our flag turns the option off; kohya's switch turns it on (the default here)
            group.add_argument(*kohya, dest=o.name, action="store_true", default=o.default,
                               help=f"kohya's switch: {o.label.lower()} (on by default here)")
            kohya = []
        names = list(dict.fromkeys(names + kohya))
        if o.flag_action:
            group.add_argument(*names, dest=o.name, action=o.flag_action, default=o.default, help=_help(o))
        else:
            group.add_argument(*names, dest=o.name, help=_help(o), **_value_kw(o))
    net_keys = ", ".join([o.kohya for o in OPTIONS if o.kohya_note == "network_args"] + ["algo"])
    groups["Network"].add_argument(*spellings("network_args"), dest="kohya_network_args", nargs="+",
                                   metavar="KEY=VALUE", default=[],
                                   help=f"kohya's network arguments: {net_keys} (algo: {' or '.join(_ALGOS)}) "
                                        "(default: unset)")
    groups["Optimizer and schedule"].add_argument(
        *spellings("optimizer_args"), dest="kohya_optimizer_args", nargs="+", metavar="KEY=VALUE", default=[],
        help="keyword arguments of the optimiser, e.g. weight_decay=0.1 betas=0.9,0.99 (default: unset)")


def _pairs(option: str, items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(option, f"expected key=value, got {item!r}")
        out.append((key.strip(), value.strip()))
    return out


def network_args(items: list[str]) -> dict[str, str]:
    """kohya's ``--network_args`` as the network options they set ({"conv_rank": "8", ...})."""
    by_kohya = {o.kohya: o for o in OPTIONS if o.kohya_note == "network_args"}
    out = {}
    for key, value in _pairs("network_args", items):
        if key == "algo":
            if value.lower() not in _ALGOS:
                raise OptionError("network_args", f"algo={value}: this trainer trains {' and '.join(_ALGOS)} "
                                                  "(LoRA, and LoCon with conv_dim) only")
        elif key in by_kohya:
            out[by_kohya[key].name] = value
        else:
            raise OptionError("network_args", f"{key} is not a network argument here: use "
                                              f"{', '.join(by_kohya)} or algo")
    return out


def optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya's ``--optimizer_args``: ``weight_decay`` sets its option, the rest go to the optimiser."""
    top: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in _pairs("optimizer_args", items):
        try:
            parsed = ast.literal_eval(value)  # as kohya reads them: numbers, tuples, booleans
        except (ValueError, SyntaxError):
            raise OptionError("optimizer_args", f"{key}={value}: not a Python literal") from None
        if key == "weight_decay":
            top["weight_decay"] = parsed
        else:
            extra[key] = parsed
    if extra:
        top["optimizer_args"] = extra
    return top


def _one(option: str, ours: Any, theirs: Any, what: str) -> Any:
    if ours is not None and theirs is not None and ours != theirs:
        raise OptionError(option, f"give {what} once")
    return ours if ours is not None else theirs


def train_data(args: argparse.Namespace) -> tuple[dict, Path]:
    """The command line as request data (options.py keys) and the folder the LoRA goes to."""
    data: dict = {"dataset": {}, "network": {}}
    for o in OPTIONS:
        if o.key in ("output_name", "output_dir") or not hasattr(args, o.name) or o.flag == "dataset":
            continue
        value = getattr(args, o.name)
        if o.type == bool | None and isinstance(value, str):
            value = AUTO_ON_OFF[value]
        (data[o.section] if o.section else data)[o.name] = value
    train_dir = _one("dataset", args.dataset, args.train_data_dir, "DATASET or --train_data_dir")
    if train_dir is None:
        raise OptionError("dataset", "is required: the folder with <repeats>_<trigger> sub-folders "
                                     "(or kohya's --train_data_dir)")
    data["dataset"]["train_dir"] = train_dir
    if getattr(args, "sample_prompts_file", None):
        data["sample_prompts"] = sample_prompts.read_file(args.sample_prompts_file)
    data["network"].update(network_args(args.kohya_network_args))
    data.update(optimizer_args(args.kohya_optimizer_args))
    if args.out is not None:
        if args.output_name is not None or args.output_dir is not None:
            raise OptionError("out", "give --out, or kohya's --output_dir and --output_name, not both")
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise OptionError("out", f"{args.out!r}: LoRAs are written as .safetensors; name the file "
                                     "NAME.safetensors")
        data["output_name"], folder = out.stem, out.parent
    elif args.output_name is not None:
        data["output_name"], folder = args.output_name, Path(args.output_dir or ".")
    else:
        raise OptionError("out", "is required: --out NAME.safetensors, or kohya's --output_dir and --output_name")
    return data, folder
