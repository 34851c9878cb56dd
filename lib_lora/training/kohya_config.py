"""kohya's training config (``--config_file config.toml``), read into request data and written back.

sd-scripts (library/train_util.py, ``read_config_from_file``) reads a TOML file whose tables only
group the arguments: each key of each table (or of the top level) is one ``train_network.py``
argument, so ``[network] network_dim = 16`` and a top-level ``network_dim = 16`` mean the same,
and values given on the command line win over the file's.  Its ``--output_config`` writes the
command line to the ``--config_file`` path instead of training, and refuses to replace a file.

Keys are kohya's argument names (the schema's ``kohya``, options.py), or this project's option
names for the options kohya has not (``save_last_k``, ``lean_frozen_layers``).  A key neither
knows is refused by name: a setting is never dropped.  kohya's options that set nothing here
(``xformers``, loader workers: options.KOHYA_NOTED) are taken and answered with a line.  ``--network_args`` and ``--optimizer_args``
are kohya's ``KEY=VALUE`` lists, read here for the command line as well.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

from . import sample_prompts, toml_io
from .errors import RequestError
from .kohya_dataset import dataset_config_data
from .options import AUTO_ON_OFF, KOHYA_NOTED, OPTIONS, REQUIRED, Option, OptionError, kohya_noted, option

# kohya's --network_args key "algo" names the LyCORIS kind networks.lora trains
ALGOS = ("lora", "locon")
# config keys that are not training options: the command line's own (kohya's names)
CLI_KEYS = ("pretrained_model_name_or_path", "resume", "device", "dataset_config")
_FILE_ONLY = ("config_file", "output_config")  # the command line's switches for this very file


class ConfigFileError(RequestError):
    """The config file cannot be used; the message names the file and the key."""


# -- kohya's KEY=VALUE lists ---------------------------------------------------------------------

def _pairs(option: str, items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise OptionError(option, f"expected key=value, got {item!r}")
        out.append((key.strip(), value.strip()))
    return out


def network_args(items: list[str]) -> dict[str, Any]:
    """kohya's ``network_args`` as the network options they set ({"conv_rank": 8, ...})."""
    by_kohya = {o.kohya: o for o in OPTIONS if o.kohya_note == "network_args"}
    out = {}
    for key, value in _pairs("network_args", items):
        if key == "algo":
            if value.lower() not in ALGOS:
                raise OptionError("network_args", f"algo={value}: this trainer trains {' and '.join(ALGOS)} "
                                                  "(LoRA, and LoCon with conv_dim) only")
        elif key in by_kohya:
            o = by_kohya[key]
            try:
                out[o.name] = o.type(value) if o.type in (int, float) else value
            except ValueError:
                raise OptionError("network_args", f"{key}={value}: expected a number") from None
        else:
            raise OptionError("network_args", f"{key} is not a network argument here: use "
                                              f"{', '.join(by_kohya)} or algo")
    return out


def optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya's ``optimizer_args``: ``weight_decay`` sets its option, the rest go to the optimiser."""
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


# -- the file's keys ---------------------------------------------------------------------------------

def _file_key(o: Option) -> str | None:
    """The key an option is written under: kohya's name, else ours; None for the list-valued ones."""
    if o.kohya_note in ("network_args", "optimizer_args", "dataset_config", "file"):
        return None
    return o.kohya if o.kohya else o.name


def _readable() -> dict[str, Option]:
    out: dict[str, Option] = {}
    for o in OPTIONS:
        key = _file_key(o)
        if key and out.setdefault(key, o) is not o:
            raise AssertionError(f"config key {key} names two options")
    return out


KEYS = _readable()  # file key -> option


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """kohya's reading: the top level's values and every table's keys, in one namespace."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        entries = value.items() if isinstance(value, dict) else [(name, value)]
        for key, v in entries:
            if isinstance(v, dict):
                raise ConfigFileError(f"{source}: [{name}] {key}: a table inside a table is not an argument")
            if key in flat:
                raise ConfigFileError(f"{source}: '{key}' is given twice")
            flat[key] = v
    return flat


def _prompt_lines(value: Any, source: str) -> list[str]:
    """kohya's sample_prompts: a prompt file (sample_prompts.read_file: .txt, .json or .toml), or our list."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return sample_prompts.read_file(Path(str(value)).expanduser())  # its OptionError names the file


def read_config(data: dict, source: str = "config file") -> tuple[dict, dict]:
    """kohya's config (parsed TOML) -> (request data, the command line's own keys by kohya's name).

    The request data holds ``network_args`` and ``optimizer_args`` read into the options they set;
    the second dict also keeps them as the file lists them (a command line's list replaces the
    file's whole list), and kohya's options that set nothing here (``noted`` words them).  Raises
    ConfigFileError naming every key that is not an option here."""
    flat = _flatten(data, source)
    unknown = [k for k in flat if k not in KEYS and k not in KOHYA_NOTED and
               k not in CLI_KEYS + ("network_args", "optimizer_args", "sample_prompts")]
    if unknown:
        raise ConfigFileError(f"{source}: not an option of this trainer: {', '.join(unknown)} (an sd-scripts "
                              "option it does not have is refused, never ignored)")
    req: dict[str, Any] = {"dataset": {}, "network": {}}
    extras: dict[str, Any] = {}
    try:
        for key, value in flat.items():
            if key in _FILE_ONLY:
                raise ConfigFileError(f"{source}: '{key}' is a command-line switch, not a setting")
            if key in KOHYA_NOTED:  # sets nothing here: kept so that the reader says what happens instead
                kohya_noted(key, value)  # (its type checked now)
                extras[key] = value
                continue
            if key in CLI_KEYS:
                if not isinstance(value, str) or not value.strip():
                    raise ConfigFileError(f"{source}: {key}: expected a path, got {value!r}")
                extras[key] = value
                continue
            if key in ("network_args", "optimizer_args"):
                extras[key] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
                if key == "network_args":
                    req["network"].update(network_args(extras[key]))
                else:
                    req.update(optimizer_args(extras[key]))
                continue
            if key == "sample_prompts":
                req["sample_prompts"] = _prompt_lines(value, source)
                continue
            o = KEYS[key]
            if isinstance(value, list) and o.type in (float, float | None):
                # kohya's text_encoder_lr takes one value per text encoder (argparse nargs="*")
                if len(set(value)) > 1:
                    raise ConfigFileError(f"{source}: {key} = {value}: one value serves every text encoder here")
                value = value[0] if value else None
            if o.kohya_note == "inverted" and key == o.kohya:
                if not isinstance(value, bool):
                    raise ConfigFileError(f"{source}: {key}: expected true or false, got {value!r}")
                value = not value
            elif o.type == bool | None and isinstance(value, str):
                if value not in AUTO_ON_OFF:
                    raise ConfigFileError(f"{source}: {key}: expected {', '.join(AUTO_ON_OFF)} or true/false")
                value = AUTO_ON_OFF[value]
            (req[o.section] if o.section else req)[o.name] = value
    except OptionError as e:
        raise ConfigFileError(f"{source}: {e}") from None
    return req, extras


def noted(extras: dict, source: str) -> list[str]:
    """The lines for kohya's options a config gave that set nothing here (options.KOHYA_NOTED)."""
    lines = [kohya_noted(k, v) for k, v in extras.items() if k in KOHYA_NOTED]
    return [f"{source}: {line}" for line in lines if line]


def load_config(path: str | Path) -> tuple[dict, dict, Path]:
    """The config file at ``path`` (".toml" added when missing, as kohya does): request data, the
    command line's own keys, and the file read."""
    path = config_path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: config file not found")
    req, extras = read_config(toml_io.load(path), str(path))
    return req, extras, path


def config_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


# -- writing ---------------------------------------------------------------------------------------

def _value(o: Option, value: Any) -> Any:
    if o.type == bool | None:
        return next(k for k, v in AUTO_ON_OFF.items() if v is value)
    if o.key == "dataset.resolution":  # kohya's --resolution is a string: "512" or "512,768"
        if isinstance(value, (tuple, list)):
            return ",".join(str(int(v)) for v in value)
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _table(o: Option) -> str:
    return (o.group or "Advanced").lower().replace(" ", "_")


# kohya's "off" for these is None (it takes steps modulo the value), ours is 0: 0 is left out
_ZERO_IS_UNSET = ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps", "sample_every_n_epochs")


def _value_of(data: dict, key: str) -> Any:
    section, _, name = key.rpartition(".")
    src = data.get(section, {}) if section else data
    return src[name] if name in src else option(key).default_value()


def _as_kohya_reads(data: dict) -> dict:
    """Our "cache where it is allowed" as kohya's "cache" (which kohya refuses where it is not
    allowed): the same training either way."""
    out = {**data, "dataset": dict(data.get("dataset", {})), "network": dict(data.get("network", {}))}
    ds = lambda k: _value_of(data, f"dataset.{k}")  # noqa: E731
    out["cache_latents"] = bool(_value_of(data, "cache_latents")) and not (ds("random_crop") or ds("color_aug"))
    varies = ds("shuffle_caption") or ds("caption_dropout_rate") or ds("caption_tag_dropout_rate") \
        or ds("caption_dropout_every_n_epochs")
    out["cache_text_encoder_outputs"] = bool(_value_of(data, "cache_text_encoder_outputs")) and not varies \
        and not _value_of(data, "network.train_text_encoder")
    return out


def config_data(data: dict, extras: dict | None = None,
                prompts_file: str | None = None) -> dict[str, dict[str, Any]]:
    """Request data (any key left out takes its default) as kohya's config: one table per section
    of the tab, every option's value (kohya's defaults differ from ours, so all are written, but for
    values that mean "not set": None, an empty text, and kohya's None-is-off intervals at 0).

    ``sample_prompts`` is kohya's prompt file, ``prompts_file``, when there is one (the command
    line's); else the prompt lines themselves, as a list (read back here; kohya needs a file)."""
    data = _as_kohya_reads(data)
    out: dict[str, dict[str, Any]] = {"input_and_output": {}}
    for key, value in (extras or {}).items():
        if value is not None:
            out["input_and_output"][key] = str(value)
    for o in OPTIONS:
        src = data.get(o.section, {}) if o.section else data
        value = src[o.name] if o.name in src else o.default_value()
        key = _file_key(o)
        if key is None or value is None or value is REQUIRED or (value == "" and o.default == "") or \
                (o.key in _ZERO_IS_UNSET and value == 0):
            continue
        if o.kohya_note == "inverted":
            value = not value
        out.setdefault(_table(o), {})[key] = _value(o, value)
    net = data.get("network", {})
    conv = net.get("conv_rank", option("network.conv_rank").default)
    if conv:  # kohya's LoCon: conv_dim and conv_alpha in network_args
        alpha = net.get("conv_alpha", option("network.conv_alpha").default)
        out["network"]["network_args"] = [f"conv_dim={conv}", f"conv_alpha={alpha}"]
    prompts = prompts_file if prompts_file else list(data.get("sample_prompts") or [])
    if prompts:
        out.setdefault(_table(option("sample_prompts")), {})["sample_prompts"] = \
            str(prompts) if isinstance(prompts, (str, Path)) else prompts
    wd = data.get("weight_decay", option("weight_decay").default)
    args = {"weight_decay": wd} if wd != option("weight_decay").default else {}
    args.update(data.get("optimizer_args") or {})
    if args:
        out["optimizer_and_schedule"]["optimizer_args"] = [f"{k}={v!r}" for k, v in args.items()]
    return {name: table for name, table in out.items() if table}


def config_toml(data: dict, extras: dict | None = None, prompts_file: str | None = None) -> str:
    return toml_io.dumps(config_data(data, extras, prompts_file))


def request_data(cfg: Any) -> dict:
    """A TrainConfig as request data (paths as text, the dataset's structure left to dataset_toml)."""
    data = dataclasses.asdict(cfg)
    data["dataset"].pop("datasets", None)
    if cfg.dataset.datasets:  # the dataset config stands for the folders
        data["dataset"].pop("train_dir", None)
        data["dataset"].pop("reg_dir", None)
    return data


def export_files(cfg: Any) -> dict[str, str]:
    """A validated TrainConfig as kohya's two files: ``{"config_toml", "dataset_toml"}``.

    The dataset config lists the subsets (a training folder's ``<repeats>_<trigger>`` folders
    become one dataset of them, as kohya reads --train_data_dir); the config then names no folder."""
    data = request_data(cfg)
    for key in ("train_dir", "reg_dir"):
        data["dataset"].pop(key, None)
    data["output_dir"] = None  # the LoRA folder is the host's
    return {"config_toml": config_toml(data),
            "dataset_toml": toml_io.dumps(dataset_config_data(cfg.dataset, cfg.batch_size))}
