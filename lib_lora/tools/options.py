"""The tools' options, declared once per tool: the command line, the API and the tab are made from here.

Each ``Tool`` lists its ``Option``s (name, type, default, choices, bounds, help, the tab's label)
and says how a set of values runs it (``Tool.run``).  ``tools/cli.py`` builds the argparse
sub-commands from the list, ``coerce`` checks an API body against it, and ``tools/ui.py`` builds
the tab's form from it, so an option is added in one place.

An option's ``kind`` says what its value names.  On the command line every file is a path; over
the API and in the tab, ``lora`` and ``loras`` are names in the LoRA library, ``checkpoint`` one
of the host's checkpoints, and ``output`` / ``checkpoint_output`` a plain file name written to the
LoRA / checkpoint folder (``tools/jobs.py`` resolves them; nothing else can name a path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..families import UNET_FAMILIES
from ..training.checks import OptionError
from .common import SAVE_DTYPES

__all__ = ["Option", "Tool", "TOOLS", "OptionError", "coerce", "tool", "FILE_KINDS", "OUTPUT_KINDS", "REQUIRED"]

REQUIRED = object()  # the default of an option that must be given
FILE_KINDS = ("lora", "loras", "checkpoint")
OUTPUT_KINDS = ("output", "checkpoint_output")
SURFACES = frozenset({"cli", "api", "tab"})
# weighted LoRA items: the numbers of the prompt's <lora:name:...> token
SPEC_HELP = "FILE[:te[:unet[:dyn]]] or FILE:te=W:unet=W (the numbers of <lora:name:...>)"


@dataclass(frozen=True)
class Option:
    name: str                       # the API key, the tab's key and argparse's dest ("dynamic_method")
    type: type                      # int, float, str or bool (of each item for ``loras``)
    default: Any = None             # None: not set; REQUIRED: must be given
    help: str = ""
    label: str = ""                 # the tab's label ("" = the help)
    kind: str = ""                  # "" (a value), or one of FILE_KINDS / OUTPUT_KINDS
    choices: tuple = ()
    minimum: float | None = None
    above: bool = False             # the minimum itself is refused
    maximum: float | None = None
    positional: bool = False        # a positional argument on the command line
    surfaces: frozenset = SURFACES  # where it is offered
    none_label: str = "none"        # how the tab shows None for a choice

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def many(self) -> bool:
        return self.kind == "loras"

    def check(self, value: Any) -> Any:
        """``value`` as this option holds it, or OptionError naming the option."""
        if value is None:
            if self.required:
                raise OptionError(self.name, "is required")
            if self.default is not None:
                raise OptionError(self.name, f"cannot be null (default {self.default!r})")
            return None
        if self.many:
            if not isinstance(value, list) or not value:
                raise OptionError(self.name, "must be a non-empty list")
            return value  # items are checked where they are resolved (tools/jobs.py)
        if self.type is bool:
            if not isinstance(value, bool):
                raise OptionError(self.name, f"must be true or false (got {value!r})")
            return value
        if self.type is str:
            if not isinstance(value, str) or not value.strip():
                raise OptionError(self.name, f"must be a non-empty string (got {value!r})")
            value = value.strip()
        elif self.type is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(self.name, f"must be a whole number (got {value!r})")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(self.name, f"must be a finite number (got {value!r})")
            value = float(value)
        if self.choices and value not in self.choices:
            raise OptionError(self.name, f"must be one of {', '.join(map(str, self.choices))} (got {value!r})")
        if self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum):
            raise OptionError(self.name, f"must be {'above' if self.above else 'at least'} {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(self.name, f"must be at most {self.maximum:g}")
        return value


@dataclass(frozen=True)
class Tool:
    name: str
    help: str                       # one line (``python -m lib_lora --help``, the tab's selector)
    description: str
    options: tuple[Option, ...]
    call: Callable[[dict[str, Any], Callable[[str], None]], Any]   # values by option name, log -> result
    uses_gpu: bool = False          # SVDs: runs under the host's model lock

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    def on(self, surface: str) -> list[Option]:
        return [o for o in self.options if surface in o.surfaces]

    def defaults(self) -> dict[str, Any]:
        return {o.name: None if o.required else o.default for o in self.options}

    def run(self, values: dict[str, Any], log: Callable[[str], None] = print) -> Any:
        """Run with ``values`` (every option; files as paths or ``merge.Spec``s)."""
        return self.call({**self.defaults(), **values}, log)


def coerce(t: Tool, body: Any) -> dict[str, Any]:
    """An API body (JSON object) checked against ``t``'s API options: every option, with defaults."""
    if not isinstance(body, dict):
        raise OptionError("body", "must be a JSON object of the tool's options")
    allowed = {o.name: o for o in t.on("api")}
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise OptionError(unknown[0], f"is not an option of {t.name} (options: {', '.join(allowed)})")
    values = {o.name: o.default for o in t.options if not o.required}
    for o in allowed.values():
        values[o.name] = o.check(body.get(o.name, None if o.required else o.default))
    return values


# -- the declarations ----------------------------------------------------------------------------------


def _dtype(value: str | None):
    return None if value in (None, "keep") else SAVE_DTYPES[value]


_CLI = frozenset({"cli"})
_FAMILY = Option("family", str, None, "model family, when the file does not say (its keys and metadata decide "
                 "otherwise)", "Model family (when the file does not say)", choices=UNET_FAMILIES,
                 none_label="from the file")
_OUT = Option("out", str, REQUIRED, "output .safetensors (API, tab: a file name in the LoRA folder)",
              "Output name (in the LoRA folder)", kind="output")
_FORCE = Option("force", bool, False, "replace an existing output file (never an input)",
                "Replace an existing file of that name")
_DEVICE = Option("device", str, None, "where SVDs run (default: cuda when available, else cpu)", surfaces=_CLI)


def _dtype_option(default: str) -> Option:
    return Option("dtype", str, default, "dtype of the written tensors", "Save as",
                  choices=("fp16", "bf16", "fp32") + (("keep",) if default == "keep" else ()))


def _rank_options(default: int | None, help_: str, label: str) -> tuple[Option, ...]:
    return (
        Option("rank", int, default, help_, label, minimum=1),
        Option("conv_rank", int, None, "rank of 3x3 conv layers (LoCon); default: the same as --rank",
               "Conv rank (0 = same as rank)", minimum=1),
        Option("dynamic_method", str, None, "choose each layer's rank (at most --rank): singular values above "
               "max/ratio, the fraction of the Frobenius norm kept, or the fraction of the singular-value sum",
               "Dynamic rank", choices=("sv_ratio", "sv_fro", "sv_cumulative"), none_label="fixed rank"),
        Option("dynamic_param", float, None, "the ratio or fraction for --dynamic-method",
               "Dynamic rank parameter", minimum=0, above=True),
        _DEVICE,
    )


def _delta_options() -> tuple[Option, ...]:
    """What resize and merge share about the deltas they decompose: dropped layers, the base, the family."""
    return (
        Option("min_norm", float, 0.0, "drop layers whose delta's Frobenius norm is below this",
               "Drop layers whose delta norm is below", minimum=0),
        Option("base", str, None, "checkpoint whose weights DoRA/OFT/IA3 deltas depend on",
               "Base checkpoint (DoRA, OFT, IA3)", kind="checkpoint"),
        _FAMILY,
    )


def _wrote(log: Callable[[str], None], result: Any) -> Any:
    log(f"wrote {result.path}")
    return result


def _resize(v: dict[str, Any], log: Callable[[str], None]) -> Any:
    from .resize import resize
    return _wrote(log, resize(v["file"], v["out"], rank=v["rank"], conv_rank=v["conv_rank"],
                              method=v["dynamic_method"], param=v["dynamic_param"], min_norm=v["min_norm"],
                              base=v["base"], family=v["family"], dtype=_dtype(v["dtype"]), force=v["force"],
                              device=v["device"], per_layer=not v["quiet"], log=log))


def _merge(v: dict[str, Any], log: Callable[[str], None]) -> Any:
    from .merge import merge
    return _wrote(log, merge(v["loras"], v["out"], rank=v["rank"], conv_rank=v["conv_rank"],
                             method=v["dynamic_method"], param=v["dynamic_param"], min_norm=v["min_norm"],
                             base=v["base"], family=v["family"], dtype=_dtype(v["dtype"]), force=v["force"],
                             device=v["device"], per_layer=v["verbose"], log=log))


def _bake(v: dict[str, Any], log: Callable[[str], None]) -> Any:
    from .bake import bake
    return bake(v["base"], v["loras"], v["out"], force=v["force"], log=log)


def _extract(v: dict[str, Any], log: Callable[[str], None]) -> Any:
    from .extract import extract
    return _wrote(log, extract(v["base"], v["tuned"], v["out"], rank=v["rank"], conv_rank=v["conv_rank"],
                               method=v["dynamic_method"], param=v["dynamic_param"], clamp=v["clamp_quantile"],
                               min_diff=v["min_diff"], dtype=_dtype(v["dtype"]), force=v["force"],
                               device=v["device"], per_layer=v["verbose"], log=log))


def _convert(v: dict[str, Any], log: Callable[[str], None]) -> Any:
    from .convert import convert
    return convert(v["file"], v["out"], to=v["to"], unet_names=v["unet_names"], dtype=_dtype(v["dtype"]),
                   family=v["family"], force=v["force"], log=log)


_LORAS = Option("loras", str, REQUIRED, SPEC_HELP, "LoRAs", kind="loras", positional=True)
_VERBOSE = Option("verbose", bool, False, "print the energy kept per layer", surfaces=_CLI)

TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("resize", "lower a LoRA's rank by SVD (any algorithm in, LoRA out)",
         "Lower a LoRA's rank by SVD of its exact per-layer delta. Any algorithm can be input; DoRA, OFT/BOFT "
         "and IA3 need --base. Output: kohya LoRA/LoCon.",
         (Option("file", str, REQUIRED, "the LoRA to resize", "LoRA", kind="lora", positional=True), _OUT,
          *_rank_options(32, "the new rank (with --dynamic-method: the largest allowed)", "Rank"),
          *_delta_options(),
          Option("quiet", bool, False, "only the overall energy kept, not each layer", surfaces=_CLI),
          _dtype_option("fp16"), _FORCE),
         _resize, uses_gpu=True),
    Tool("merge", "combine LoRAs with weights into one LoRA",
         "Combine LoRAs into one: exactly (ranks side by side) without --rank, or the best approximation of "
         "--rank by SVD. Inputs: " + SPEC_HELP,
         (_LORAS, _OUT, *_rank_options(None, "SVD to this rank (default: exact merge)", "Rank (0 = exact merge)"),
          *_delta_options(), _VERBOSE, _dtype_option("fp16"), _FORCE),
         _merge, uses_gpu=True),
    Tool("bake", "merge LoRAs into a checkpoint (single-file safetensors)",
         "Merge LoRAs with weights into a checkpoint, one tensor at a time. The output has the input's keys "
         "and dtypes. LoRAs: " + SPEC_HELP,
         (Option("base", str, REQUIRED, "single-file checkpoint (.safetensors; a .ckpt is read whole)",
                 "Checkpoint", kind="checkpoint", positional=True), _LORAS,
          Option("out", str, REQUIRED, "output .safetensors (API, tab: a file name in the checkpoint folder)",
                 "Output name (in the checkpoint folder)", kind="checkpoint_output"), _FORCE),
         _bake),
    Tool("extract", "a LoRA from a base and a fine-tuned checkpoint",
         "Build a LoRA (LoCon with --conv-rank) from the difference of two checkpoints of one family, as "
         "kohya's extract_lora_from_models does. Convs (resnets, samplers) only with --conv-rank.",
         (Option("base", str, REQUIRED, "the base checkpoint", "Base checkpoint", kind="checkpoint",
                 positional=True),
          Option("tuned", str, REQUIRED, "the fine-tuned checkpoint", "Fine-tuned checkpoint", kind="checkpoint",
                 positional=True), _OUT,
          *_rank_options(4, "rank (with --dynamic-method: the largest allowed)", "Rank"),
          Option("clamp_quantile", float, 0.99, "clamp factors to this quantile (1: off)", "Clamp quantile (1 = off)",
                 minimum=0, above=True, maximum=1),
          Option("min_diff", float, 0.01, "leave the text encoder out when no weight of it changed by more than this",
                 "Text encoder: smallest change kept", minimum=0),
          _VERBOSE, _dtype_option("fp16"), _FORCE),
         _extract, uses_gpu=True),
    Tool("convert", "kohya <-> diffusers/PEFT keys, SDXL UNet spellings, dtype",
         "Rewrite a LoRA's keys: kohya or diffusers/PEFT (alphas in lora_adapter_metadata, as diffusers' "
         "load_lora_weights reads them); SDXL UNet keys the SGM or diffusers way; and/or its dtype. Metadata is "
         "carried over.",
         (Option("file", str, REQUIRED, "the LoRA to convert", "LoRA", kind="lora", positional=True), _OUT,
          Option("to", str, "kohya", "key format", "Key format", choices=("kohya", "diffusers")),
          Option("unet_names", str, None, "SDXL kohya UNet spelling (default: sgm, kohya's own)",
                 "SDXL UNet spelling", choices=("sgm", "diffusers"), none_label="sgm (kohya's)"),
          _FAMILY, _dtype_option("keep"), _FORCE),
         _convert),
]}


def tool(name: str) -> Tool:
    """The tool called ``name``; KeyError names the known ones."""
    try:
        return TOOLS[name]
    except KeyError:
        raise KeyError(f"unknown tool {name!r} ({', '.join(TOOLS)})") from None
