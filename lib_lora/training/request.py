"""A training request (the tab's form, the API's JSON, the command line) -> a validated ``JobRequest``.

The keys, their types and their bounds come from the option schema (options.py); this module adds
what only a request has: presets, the paths a request may name (datasets inside the host's
roots, state files inside the LoRA folder), "auto" mixed precision and resuming from a state file.
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import TRAINING_STATE_SUFFIX as STATE_SUFFIX, LoraFileError
from . import options
from . import kohya_config, kohya_dataset, toml_io
from .dataset import DatasetConfig
from .errors import RequestError, one_line
from .network import NetworkConfig
from .options import OptionError
from .outputs import check_output_name
from .presets import PRESETS, preset_for_family
from .problems import DatasetError
from .config import TrainConfig
from .state import is_state_file, read_state_header
from .subsets import DATASET_FIELDS, OWN_KEYS, SUBSET_FIELDS

# -- requests -> TrainConfig ---------------------------------------------------------------------------

# not request keys: the LoRA folder is the host's; world_size is a key of older state files
_TOP_EXCLUDED = {"dataset", "network", "output_dir", "world_size"}
_EXTRA_TOP = {"preset", "resume_from", "config_toml", "dataset_toml"}


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Make JSON/gradio values fit a dataclass field (gradio numbers are floats, paths are str)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RequestError.bad(where, "a value is required")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(where, a, value)
            except RequestError as e:
                errors.append(e)
        raise errors[0] if errors else RequestError.bad(where, f"invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise RequestError.bad(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RequestError.bad(where, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        raise RequestError.bad(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RequestError.bad(where, f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise RequestError.bad(where, f"expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise RequestError.bad(where, f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise RequestError.bad(where, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise RequestError.bad(where, f"expected a folder path, got {value!r}")
        return Path(str(value).strip())
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RequestError.bad(where, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(where, a, v) for a, v in zip(args, value))
    if origin is list:
        if isinstance(value, str):  # one per line (a textbox)
            value = [line for line in value.splitlines() if line.strip()]
        if not isinstance(value, (list, tuple)):
            raise RequestError.bad(where, f"expected a list, got {value!r}")
        return [_coerce(where, args[0], v) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RequestError.bad(where, f"expected an object, got {value!r}")
        return dict(value)
    return value


def _fields(set_name: str, data: dict, skip: set[str] = frozenset()) -> dict:
    """One option set's keys of a request, coerced to the schema's types; unknown keys are refused."""
    if not isinstance(data, dict):
        raise RequestError.bad(set_name, f"expected an object, got {type(data).__name__}")
    known = {o.name: o for o in options.section(set_name) if o.name not in skip}
    out = {}
    for key, value in data.items():
        where = f"{set_name}.{key}" if set_name else key
        if key not in known:
            raise RequestError(f"unknown option '{where}'")
        out[key] = _coerce(where, known[key].type, value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k in ("dataset", "network"):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _dataset_dir(value: Any, where: str, roots: list[Path] | None) -> Path:
    if not isinstance(value, (str, Path)):
        raise RequestError.bad(where, f"expected a folder path, got {value!r}")
    path = Path(str(value)).expanduser()
    if roots is not None and not _inside(path, roots):
        # checked before existence, so a refusal says nothing about folders outside the roots
        raise RequestError.bad(where, f"{value} is outside the dataset folders this server may read "
                                      f"(add its parent folder to the setting that lists them)")
    if not path.is_dir():
        raise RequestError.bad(where, f"dataset folder not found: {value}")
    return path


def resolve_state_file(value: Any, output_dir: Path) -> Path:
    """A training state file (``*-state.safetensors``, or an older ``*.state.safetensors``) inside the LoRA
    folder, by name relative to it."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"resume_from: expected the name of a {STATE_SUFFIX} file in the LoRA folder")
    name = value.strip().replace("\\", "/")
    root = Path(output_dir).resolve()
    path = (root / name).resolve()
    if not is_state_file(name) or root not in path.parents:
        raise RequestError(f"resume_from {value!r}: must name a {STATE_SUFFIX} file inside the LoRA folder")
    if not path.is_file():
        raise RequestError(f"resume_from: state file not found: {name}")
    return path


def _weights_file(value: Any, output_dir: Path, confined: bool) -> Path:
    """kohya's ``network_weights``: the LoRA file training starts from.  A relative name is taken in
    the LoRA folder; a remote request may only name a file there."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise RequestError.bad("network_weights", f"expected a .safetensors file, got {value!r}")
    root = Path(output_dir).resolve()
    path = (root / Path(str(value).strip()).expanduser()).resolve()
    if confined and root not in path.parents:
        raise RequestError.bad("network_weights", f"{value}: must name a file inside the LoRA folder")
    if path.suffix.lower() != ".safetensors":
        raise RequestError.bad("network_weights", f"{value}: expected a .safetensors LoRA file")
    if not path.is_file():
        raise RequestError.bad("network_weights", f"file not found: {value}")
    return path


def _folder_inside(option: str, value: Any, output_dir: Path) -> Path:
    """A folder a remote request names for writing: relative to the LoRA folder, and inside it."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise RequestError.bad(option, f"expected a folder path, got {value!r}")
    root = Path(output_dir).resolve()
    path = (root / str(value).strip()).resolve()
    if path != root and root not in path.parents:
        raise RequestError.bad(option, f"{value}: must name a folder inside the LoRA folder")
    return path


def stored_config(path: Path) -> dict:
    """The TrainConfig (as a dict) a training state file was saved with, read from its header only."""
    try:
        return read_state_header(path).config
    except (LoraFileError, OSError) as e:
        raise RequestError(f"resume_from: cannot use {Path(path).name}: {e}") from None


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or r in real.parents for r in (Path(x).resolve() for x in roots))


def _datasets(value: Any, roots: list[Path] | None) -> list[dict]:
    """``dataset.datasets`` (kohya's dataset config, subsets.py) with its values coerced and every
    image_dir checked as a dataset folder is; the structure itself is checked by DatasetConfig."""
    if not isinstance(value, list):
        raise RequestError.bad("dataset.datasets", f"expected a list, got {type(value).__name__}")

    def entry(where: str, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj  # DatasetConfig names it
        out = {}
        for key, v in obj.items():
            w = f"{where}.{key}"
            if key == "subsets" and isinstance(v, list):
                out[key] = [entry(f"{where}.subsets[{i}]", sub) for i, sub in enumerate(v)]
            elif key == "image_dir":
                out[key] = str(_dataset_dir(v, w, roots))
            elif key in OWN_KEYS:
                out[key] = _coerce(w, OWN_KEYS[key], v)
            elif key in DATASET_FIELDS + SUBSET_FIELDS:
                v = tuple(v) if key == "resolution" and isinstance(v, list) else v
                out[key] = _coerce(w, options.option(f"dataset.{key}").type, v)
            else:
                out[key] = v
        return out

    return [entry(f"dataset.datasets[{d}]", part) for d, part in enumerate(value)]


def _config_toml(text: Any, roots: list[Path] | None, notes: list[str]) -> tuple[dict, dict | None]:
    """``config_toml`` -> (its request data, the dataset config its dataset_config names, or None)."""
    if not isinstance(text, str):
        raise RequestError(f"config_toml: expected the text of a config.toml, got {type(text).__name__}")
    data, extras = kohya_config.read_config(toml_io.loads(text, "config_toml"), "config_toml")
    notes.extend(kohya_config.noted(extras, "config_toml"))
    for key in ("pretrained_model_name_or_path", "resume", "device"):
        if key in extras:
            notes.append(f"config_toml: {key} is not used here (the loaded model is trained; resume_from "
                         "resumes)")
    if data.pop("output_dir", None) is not None:
        notes.append("config_toml: output_dir is not used here: LoRAs go to the LoRA folder")
    dataset = None
    if "dataset_config" in extras:
        path = Path(extras["dataset_config"]).expanduser()
        if roots is not None and not _inside(path, roots):
            raise RequestError(f"config_toml: dataset_config {path} is outside the dataset folders this server "
                               "may read")
        dataset = toml_io.load(path)
    return data, dataset


@dataclass
class JobRequest:
    config: TrainConfig
    name: str
    resume_from: Path | None = None
    auto_precision: bool = False
    preset: str = "sd15"
    notes: list[str] = field(default_factory=list)  # what a config_toml gave that is not used here


def build_request(data: dict, output_dir: Path, family: str | None = None,
                  dataset_roots: list[Path] | None = None, presets: bool = True) -> JobRequest:
    """A JSON request -> validated JobRequest.  Keys:

    ``output_name`` (required unless resuming), ``preset`` ("auto" | "sd15" | "sdxl" | "toy"),
    ``dataset`` {DatasetConfig fields; ``train_dir`` required}, ``network`` {NetworkConfig fields},
    any other TrainConfig field at the top level (``mixed_precision`` also takes "auto"),
    ``resume_from`` (a state file name in the LoRA folder: its stored settings are used, the
    request's keys override them).  ``output_dir`` cannot be chosen: it is the LoRA folder.
    ``dataset_roots``, when given, are the only folders the dataset paths may lie in.
    ``presets=False``: no preset applies, the schema's defaults do (the command line's way).

    kohya's files, as text: ``config_toml`` (a config.toml; with it no preset applies unless one is
    named, and the request's own keys win over it) and ``dataset_toml`` (a dataset.toml; it replaces
    ``dataset.train_dir``/``reg_dir`` and its settings win over ``dataset``'s, kohya's order).
    """
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = set(data) - {o.name for o in options.section("") if o.name not in _TOP_EXCLUDED} - _EXTRA_TOP \
        - {"dataset", "network"}
    if unknown:
        bad = sorted(unknown)[0]
        hint = " (output always goes to the LoRA folder; set output_name)" if bad == "output_dir" else ""
        raise RequestError(f"unknown option '{bad}'{hint}")
    for part in ("dataset", "network"):
        if part in data and not isinstance(data[part], dict):
            raise RequestError(f"{part}: expected an object, got {type(data[part]).__name__}")
    notes: list[str] = []
    from_config, dataset_file = {}, None
    if data.get("config_toml") not in (None, ""):
        from_config, dataset_file = _config_toml(data["config_toml"], dataset_roots, notes)
    if data.get("dataset_toml") not in (None, ""):
        if not isinstance(data["dataset_toml"], str):
            raise RequestError("dataset_toml: expected the text of a dataset.toml")
        if dataset_file is not None:
            notes.append("config_toml: its dataset_config gives way to dataset_toml")
        dataset_file = toml_io.loads(data["dataset_toml"], "dataset_toml")
    resume = None
    if data.get("resume_from") not in (None, ""):
        resume = resolve_state_file(data["resume_from"], output_dir)
        stored = stored_config(resume)
        # the state holds the network: the file the run started from is not needed again
        base = {k: v for k, v in stored.items() if k not in _TOP_EXCLUDED and k != "network_weights"}
        for part in ("dataset", "network"):
            if not isinstance(stored.get(part) or {}, dict):
                raise RequestError(f"resume_from: {resume.name} holds a damaged {part} configuration")
            base[part] = dict(stored.get(part) or {})
        preset = "resume"
    elif not presets or (data.get("config_toml") not in (None, "") and not data.get("preset")):
        base, preset = {}, "none"
    else:
        preset = data.get("preset") or "auto"
        if not isinstance(preset, str):
            raise RequestError(f"preset: expected one of auto, {', '.join(PRESETS)}, got {preset!r}")
        if preset == "auto":
            preset = preset_for_family(family)
        if preset not in PRESETS:
            raise RequestError(f"preset {preset!r}: choose one of auto, {', '.join(PRESETS)}")
        base = json.loads(json.dumps(PRESETS[preset]))
    merged = _merge(_merge(base, from_config), {k: v for k, v in data.items() if k not in _EXTRA_TOP})
    if dataset_file is not None:
        given = [k for k in ("train_dir", "reg_dir") if (data.get("dataset") or {}).get(k) not in (None, "")]
        if given:
            raise RequestError(f"dataset.{given[0]}: give it or dataset_toml, not both (the dataset config "
                               "names the image folders)")
        general, top_file = kohya_dataset.read_dataset_config(dataset_file, "dataset_toml")
        if any(k in from_config.get("dataset", {}) for k in ("train_dir", "reg_dir")):
            notes.append("config_toml: train_data_dir and reg_data_dir give way to the dataset config "
                         "(kohya ignores them too)")
        merged["dataset"] = {k: v for k, v in (merged.get("dataset") or {}).items()
                             if k not in ("train_dir", "reg_dir")}
        merged["dataset"].update(general)
        merged.update(top_file)
    if data.get("max_train_steps") is not None and "max_train_epochs" not in data:
        # a length in steps replaces the preset's (or the resumed run's) length in epochs, which
        # would otherwise win (kohya's rule when both are set)
        merged["max_train_epochs"] = None

    ds_data = dict(merged.get("dataset") or {})
    if ds_data.get("datasets"):
        ds_data["datasets"] = _datasets(ds_data["datasets"], dataset_roots)
        if ds_data.get("train_dir") not in (None, ""):
            raise RequestError("dataset.train_dir: give it or dataset.datasets, not both")
        ds_data["train_dir"] = None
    elif not ds_data.get("train_dir"):
        raise RequestError("dataset.train_dir is required: the folder holding '<repeats>_<trigger>' sub-folders "
                           "(or a dataset_toml)")
    else:
        ds_data["train_dir"] = str(_dataset_dir(ds_data["train_dir"], "dataset.train_dir", dataset_roots))
    if ds_data.get("reg_dir") not in (None, ""):
        ds_data["reg_dir"] = str(_dataset_dir(ds_data["reg_dir"], "dataset.reg_dir", dataset_roots))
    else:
        ds_data["reg_dir"] = None
    if isinstance(ds_data.get("resolution"), list):
        ds_data["resolution"] = tuple(ds_data["resolution"])
    ds_kwargs = _fields("dataset", ds_data)
    net_kwargs = _fields("network", dict(merged.get("network") or {}))

    top = {k: v for k, v in merged.items() if k not in ("dataset", "network")}
    try:
        name = check_output_name(top.get("output_name"))
    except OptionError as e:
        raise RequestError.of(e) from None
    top["output_name"] = name
    if top.get("network_weights") not in (None, ""):
        top["network_weights"] = str(_weights_file(top["network_weights"], output_dir, dataset_roots is not None))
    else:
        top.pop("network_weights", None)
    if top.get("logging_dir") not in (None, "") and dataset_roots is not None:
        top["logging_dir"] = str(_folder_inside("logging_dir", top["logging_dir"], output_dir))
    if family == "sd2" and not top.get("v2"):
        # the family is read from the weights and v2 only confirms it; a form built before the checkpoint
        # switch (or a request without it) would export a config.toml that sd-scripts cannot load SD2 with
        top["v2"] = True
    auto = top.get("mixed_precision", "auto") in ("auto", None, "")
    if auto:  # full_fp16/full_bf16 name the type; otherwise resolved from the model's dtype once it is built
        half = "fp16" if top.get("full_fp16") else "bf16" if top.get("full_bf16") else None
        top["mixed_precision"], auto = (half, False) if half else ("no", True)
    top_kwargs = _fields("", top, skip=_TOP_EXCLUDED)
    try:
        dataset = DatasetConfig(**ds_kwargs)
        dataset.subsets()  # the datasets' structure: a misplaced or unknown key is named now
        network = NetworkConfig(**net_kwargs)
        cfg = TrainConfig(dataset=dataset, network=network, output_dir=Path(output_dir), **top_kwargs)
    except OptionError as e:
        raise RequestError.of(e) from None
    except (TypeError, ValueError) as e:
        raise RequestError(one_line(e) if not isinstance(e, DatasetError) else str(e)) from None
    if not (network.train_unet or network.train_text_encoder):
        raise RequestError("network: train_unet and train_text_encoder are both off: nothing to train")
    return JobRequest(cfg, name, resume, auto, preset, notes)
