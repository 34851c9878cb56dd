"""The ``train`` command's arguments, generated from the option schema (options.py), and its request.

Each option's flag is accepted with hyphens or underscores (``--network-dim``, ``--network_dim``),
and so is its name in kohya's sd-scripts (``--train_batch_size``, ``--optimizer_type``), so a
``train_network.py`` command line works as it is.  kohya's ``--network_args "conv_dim=8" …`` and
``--optimizer_args "weight_decay=0.1" …`` are read into the options they name.  ``--help`` lists
the options in the tab's sections, each with its help line and its default.

kohya's config files apply in kohya's order: ``--config_file``'s values under the command line's
(``with_config_file``), and ``--dataset_config``'s over both (``train_data``); ``--output_config``
writes the command line to the ``--config_file`` path (``write_output_config``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import sample_prompts, toml_io
from .kohya_config import ALGOS, config_path, config_toml, load_config, network_args, \
    optimizer_args
from .kohya_dataset import read_dataset_config
from .options import AUTO_ON_OFF, GROUPS, KOHYA_NOTED, OPTIONS, REQUIRED, Option, OptionError, kohya_noted, option

IO_GROUP = "Input and output"
_HELP_GROUPS = [IO_GROUP] + [g for g, _ in GROUPS]
# options the command line takes from kohya's own key=value lists or files
_NOT_FLAGS = ("network_args", "optimizer_args", "file", "dataset_config")


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
    # not required by argparse: --config_file may give it (checked in train_data)
    io.add_argument("--base", "--pretrained_model_name_or_path", "--pretrained-model-name-or-path", dest="base",
                    help="single-file .safetensors checkpoint (a .yaml beside it is read) (required)")
    io.add_argument("--out", help="output NAME.safetensors path (required, or --output_dir and --output_name)")
    io.add_argument("--resume", help="a NAME-state.safetensors file written by --save-state (default: unset)")
    io.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    io.add_argument(*spellings("config_file"), dest="config_file", metavar="TOML",
                    help="kohya's config.toml: its values, with the command line's winning (default: unset)")
    io.add_argument(*spellings("output_config"), dest="output_config", action="store_true",
                    help="write this command line to --config_file instead of training (default: off)")
    io.add_argument(*spellings("dataset_config"), dest="dataset_config", metavar="TOML",
                    help="kohya's dataset.toml ([general], [[datasets]], [[datasets.subsets]]); it replaces "
                         "DATASET and --reg_data_dir, and its settings win over the command line's, as in kohya "
                         "(default: unset)")
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
                                   help=f"kohya's network arguments: {net_keys} (algo: {' or '.join(ALGOS)}) "
                                        "(default: unset)")
    groups["Optimizer and schedule"].add_argument(
        *spellings("optimizer_args"), dest="kohya_optimizer_args", nargs="+", metavar="KEY=VALUE", default=[],
        help="keyword arguments of the optimiser, e.g. weight_decay=0.1 betas=0.9,0.99 (default: unset)")
    for name, (kind, line) in KOHYA_NOTED.items():  # kohya's, accepted and answered (options.KOHYA_NOTED)
        kw: dict[str, Any] = {"action": "store_true"} if kind is None else {"type": kind, "metavar": "N"}
        shown = "off" if kind is None else "unset"
        groups["Advanced"].add_argument(*spellings(name), dest=_noted_dest(name), default=None,
                                        help=f"kohya's; sets nothing: {line} (default: {shown})".replace("%", "%%"),
                                        **kw)


def _noted_dest(name: str) -> str:
    return f"kohya_noted_{name}"


def noted_lines(args: argparse.Namespace) -> list[str]:
    """What kohya's options that set nothing here (given on the command line or in --config_file) get
    instead, one line each."""
    lines = [kohya_noted(name, getattr(args, _noted_dest(name), None)) for name in KOHYA_NOTED
             if getattr(args, _noted_dest(name), None) is not None]
    return [line for line in lines if line]


def _one(option: str, ours: Any, theirs: Any, what: str) -> Any:
    if ours is not None and theirs is not None and ours != theirs:
        raise OptionError(option, f"give {what} once")
    return ours if ours is not None else theirs


def _option_data(args: argparse.Namespace) -> dict:
    """The options on the namespace as request data (without the folders and the output)."""
    data: dict = {"dataset": {}, "network": {}}
    for o in OPTIONS:
        if o.key in ("output_name", "output_dir") or not hasattr(args, o.name) or o.flag == "dataset":
            continue
        value = getattr(args, o.name)
        if o.type == bool | None and isinstance(value, str):
            value = AUTO_ON_OFF[value]
        (data[o.section] if o.section else data)[o.name] = value
    if getattr(args, "sample_prompts_file", None):
        data["sample_prompts"] = sample_prompts.read_file(args.sample_prompts_file)
    data["network"].update(network_args(args.kohya_network_args))
    data.update(optimizer_args(args.kohya_optimizer_args))
    return data


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _dataset_config(args: argparse.Namespace, data: dict) -> None:
    """--dataset_config into ``data``: its [general] settings win over the command line's, which stay
    the fallback for what it leaves out (kohya's order), and it replaces the training folders."""
    path = Path(args.dataset_config).expanduser()
    general, top = read_dataset_config(toml_io.load(path), str(path))
    ignored = [f for f, v in (("DATASET", args.dataset), ("--train_data_dir", args.train_data_dir),
                              ("--reg_data_dir", data["dataset"].get("reg_dir"))) if v is not None]
    if ignored:
        _warn(f"{', '.join(ignored)} ignored: --dataset_config gives the images (as kohya ignores them)")
    for key, value in [*general.items(), *top.items()]:
        o = option(f"dataset.{key}" if key != "batch_size" else key)
        ours = (data["dataset"] if o.section else data).get(key, o.default_value())
        if key != "datasets" and ours != o.default_value() and ours != value:
            _warn(f"{_spelling(o)} {ours} is overridden by {path.name}'s {key} = {value!r} "
                  "(the dataset config wins, as in kohya)")
    data["dataset"].pop("reg_dir", None)
    data["dataset"].update(general)
    data.update(top)


def _spelling(o: Option) -> str:
    return o.flag if o.flag and o.flag.startswith("--") else f"--{o.kohya or o.name}"


def train_data(args: argparse.Namespace) -> tuple[dict, Path]:
    """The command line as request data (options.py keys) and the folder the LoRA goes to."""
    if not args.base:
        raise OptionError("base", "is required: the checkpoint to train on (kohya's "
                                  "--pretrained_model_name_or_path, also read from --config_file)")
    data = _option_data(args)
    if args.dataset_config:
        _dataset_config(args, data)
    else:
        train_dir = _one("dataset", args.dataset, args.train_data_dir, "DATASET or --train_data_dir")
        if train_dir is None:
            raise OptionError("dataset", "is required: the folder with <repeats>_<trigger> sub-folders "
                                         "(or kohya's --train_data_dir, or --dataset_config)")
        data["dataset"]["train_dir"] = train_dir
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


# -- kohya's --config_file and --output_config -----------------------------------------------------

_CLI_DESTS = {"pretrained_model_name_or_path": "base", "resume": "resume", "device": "device",
              "dataset_config": "dataset_config"}


def with_config_file(sp: argparse.ArgumentParser, argv: list[str],
                     args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """kohya's --config_file: the file's values start the namespace, then the command line (``argv``
    after the subcommand) is parsed over them, so what it gives wins.  A --network_args or
    --optimizer_args list on the command line replaces the file's whole list, as in kohya."""
    req, extras, path = load_config(args.config_file)
    ns = argparse.Namespace()
    for key, value in extras.items():
        if key in _CLI_DESTS:
            setattr(ns, _CLI_DESTS[key], value)
        elif key in KOHYA_NOTED:
            setattr(ns, _noted_dest(key), value)
    lists = {k: extras[k] for k in ("network_args", "optimizer_args") if k in extras}
    from_lists = set(network_args(lists.get("network_args", []))) | \
        set(optimizer_args(lists.get("optimizer_args", [])))
    ns.kohya_network_args = lists.get("network_args", [])
    ns.kohya_optimizer_args = lists.get("optimizer_args", [])
    for o in OPTIONS:
        src = req.get(o.section, {}) if o.section else req
        if o.name not in src or o.name in from_lists:
            continue
        value = src[o.name]
        if o.key == "dataset.train_dir":
            ns.train_data_dir = value
        else:
            setattr(ns, o.name, next(k for k, v in AUTO_ON_OFF.items() if v is value)
                    if o.type == bool | None and not isinstance(value, str) else value)
    given = dict(vars(ns))
    rest = argv[argv.index(args.command) + 1:]
    out, extra = sp.parse_known_args(rest, namespace=ns)
    # what the command line says another way than the file wins too: --out over the file's
    # output_dir/output_name, DATASET over its train_data_dir
    if out.out is not None:
        for key in ("output_name", "output_dir"):
            if key in given and getattr(out, key) == given[key]:
                setattr(out, key, None)
    if out.dataset is not None and "train_data_dir" in given and out.train_data_dir == given["train_data_dir"]:
        out.train_data_dir = None
    out.config_file, out.command = str(path), args.command
    return out, extra


def write_output_config(args: argparse.Namespace) -> Path:
    """kohya's --output_config: the command line's settings written to the --config_file path (".toml"
    added when missing); an existing file is refused, never replaced."""
    if not args.config_file:
        raise OptionError("output_config", "needs --config_file: the file to write")
    path = config_path(args.config_file)
    if path.exists():
        raise FileExistsError(f"{path} exists: --output_config never replaces a file (remove it, or name "
                              "another --config_file)")
    data = _option_data(args)
    train_dir = _one("dataset", args.dataset, args.train_data_dir, "DATASET or --train_data_dir")
    if train_dir is not None:
        data["dataset"]["train_dir"] = train_dir
    if args.out is not None:
        out = Path(args.out)
        data["output_dir"], data["output_name"] = str(out.parent), out.stem
    else:
        data["output_dir"] = args.output_dir
        if args.output_name is not None:
            data["output_name"] = args.output_name
    extras = {key: getattr(args, dest) for key, dest in _CLI_DESTS.items()}
    prompts = getattr(args, "sample_prompts_file", None)  # kohya's config names the prompt file
    text = config_toml(data, extras, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:  # "x": never replaces a file that appeared meanwhile
        f.write(text)
    return path
