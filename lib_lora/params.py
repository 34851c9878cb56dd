"""WebUI prompt syntax: the ``<lora:name:te:unet:dyn>`` token, parsed the way the WebUI does (plus
the LoRA Block Weight extension's arguments), and escaping text that must reach the WebUI's prompt
parser literally."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Mapping

from .blockweights import BlockWeightError, BlockWeights, parse_block_weights
from .elementweights import ElementWeights, parse_element_weights

if TYPE_CHECKING:
    from .modelmap import Target

_TOKEN = re.compile(r"<(\w+):([^>]+)>")
NETWORK_TYPES = ("lora", "lyco")
_FLOAT32_MAX = 3.4028234663852886e38  # deltas are summed in float32


@dataclass(frozen=True)
class LoraRequest:
    """One ``<lora:...>`` token: which file, and at what weights (what the patcher applies)."""
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    blocks: BlockWeights | None = None   # lbw=: per-block multipliers
    elements: ElementWeights | None = None  # lbwe=: per-element weights, over the block ones
    start: int | None = None             # UNet joins once this many sampling steps are done
    stop: int | None = None              # ... and leaves once this many are done
    warnings: tuple[str, ...] = ()       # arguments that were ignored, for the user

    @property
    def scheduled(self) -> bool:
        return self.start is not None or self.stop is not None

    def without_schedule(self) -> "LoraRequest":
        return replace(self, start=None, stop=None)

    @property
    def per_layer(self) -> bool:
        return self.blocks is not None or self.elements is not None

    def multiplier(self, target: "Target", block: str | None, layer: str | None = None) -> float:
        """``block``: the target's LBW block, ``layer``: its LBW name (``elementweights.lbw_layer_name``)."""
        mult = self.te if target.is_text_encoder else self.unet
        if not self.per_layer:
            return mult
        w = self.blocks.weight(block) if self.blocks is not None else 1.0
        if self.elements is not None:
            w = self.elements.weight(layer, block, w)
        return mult * w


class ParamError(ValueError):
    pass


KNOWN_NAMED = ("te", "unet", "dyn", "lbw", "w", "x", "lbwe", "start", "stop", "step")


def parse_args(positional: list[str], named: dict[str, str], default: float = 1.0,
               presets: Mapping[str, str] | None = None,
               element_presets: Mapping[str, str] | None = None) -> LoraRequest:
    """Positional: name, te, unet, dyn. ``unet`` defaults to ``te``; named values win.

    Beyond the built-in's arguments, LBW's ``lbw=`` (also ``w=``, or a preset/vector in the unet
    position), ``x=``, ``lbwe=`` (also a word in the dyn position), ``start=``, ``stop=`` and
    ``step=A-B`` are read.  Arguments that are unknown or unusable never drop the LoRA (the built-in
    ignores unknown ones too): they become warnings.  ``presets``/``element_presets``: LBW's
    block-weight and element presets by name (its defaults when None).
    """
    if not positional or not positional[0].strip():
        raise ParamError("lora token without a name")
    name = positional[0].strip()
    warnings: list[str] = []

    def num(value: str, what: str, cast=float):
        try:
            out = cast(value)
        except (ValueError, OverflowError):
            raise ParamError(f"<lora:{name}>: {what}={value!r} is not a number") from None
        if not math.isfinite(out) or abs(out) > _FLOAT32_MAX:  # nan, inf, 1e400: never merged into a model
            raise ParamError(f"<lora:{name}>: {what}={value!r} is not a finite number — skipped")
        return out

    def given(i: int) -> bool:
        return len(positional) > i and positional[i] != ""

    spec = named.get("lbw", named.get("w"))
    x_text = named.get("x")
    elem_name = named.get("lbwe")
    if given(3) and not _is_number(positional[3]):
        # LBW reads a word in the fourth place as lbwe= (the built-in cannot read it as dyn)
        elem_name = positional[3] if elem_name is None else elem_name
        positional = positional[:3]
    unet_pos = given(2)
    if given(2) and spec is None and not _is_number(positional[2]):
        # <lora:name:1:MIDD> (LBW's older form): the third item is block weights, the fourth x
        spec, unet_pos = positional[2], False
        if given(3) and x_text is None:
            x_text = positional[3]
            positional = positional[:3]
    te = num(positional[1], "te") if given(1) else default
    unet = num(positional[2], "unet") if unet_pos else te
    dyn = num(positional[3], "dyn", int) if given(3) else None
    if "te" in named:
        te = num(named["te"], "te")
        if "unet" not in named and not unet_pos:
            unet = te
    if "unet" in named:
        unet = num(named["unet"], "unet")
    if "dyn" in named:
        dyn = num(named["dyn"], "dyn", int)

    blocks = None
    if spec is not None:
        try:
            x = float(x_text) if x_text is not None else 1.0
            if not math.isfinite(x):
                raise ValueError(f"x={x_text} is not a finite number")
            blocks = parse_block_weights(spec, presets, x)
        except ValueError as e:  # BlockWeightError or a bad x=
            warnings.append(f"{name}: lbw={spec}: {e} — applied without block weights")
    elements = None
    if elem_name is not None:
        try:
            elements = parse_element_weights(elem_name, element_presets)
        except BlockWeightError as e:
            warnings.append(f"{name}: lbwe={elem_name}: {e} — applied without element weights")
    start, stop = _schedule(name, named, warnings)
    for key, value in named.items():
        if key not in KNOWN_NAMED:
            warnings.append(f"{name}: unknown argument {key}={value} ignored")
    return LoraRequest(name, te, unet, dyn, blocks, elements, start, stop, tuple(warnings))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _schedule(name: str, named: dict[str, str], warnings: list[str]) -> tuple[int | None, int | None]:
    """start=/stop= in sampling steps; ``step=A-B`` (LBW) means start=A stop=B and wins over both."""
    texts = {"start": named.get("start"), "stop": named.get("stop")}
    step = named.get("step")
    if step is not None:
        a, sep, b = step.partition("-")
        if sep:
            texts = {"start": a, "stop": b}
        else:
            warnings.append(f"{name}: step={step} is not a range like step=5-10 — ignored")
    out: dict[str, int | None] = {}
    for key, text in texts.items():
        if text is None:
            out[key] = None
            continue
        try:
            out[key] = int(text)
        except ValueError:
            warnings.append(f"{name}: {key}={text} is not a whole number of steps — ignored")
            out[key] = None
    return out["start"], out["stop"]


def split_items(items: list[str]) -> tuple[list[str], dict[str, str]]:
    """Like the WebUI's ExtraNetworkParams: an item with exactly one '=' is named."""
    positional, named = [], {}
    for item in items:
        if item.count("=") == 1:
            k, _, v = item.partition("=")
            named[k.strip()] = v.strip()
        else:
            positional.append(item)
    return positional, named


def requests_from_items(items_lists: Iterable[Sequence[Any]], default: float = 1.0,
                        presets: Mapping[str, str] | None = None,
                        element_presets: Mapping[str, str] | None = None) -> tuple[list[LoraRequest], list[str]]:
    """``<lora:...>`` argument lists (as the WebUI splits them) -> requests, plus messages for bad ones
    (``presets``/``element_presets``: LBW block-weight and element presets by name)."""
    requests: list[LoraRequest] = []
    messages: list[str] = []
    for items in items_lists:
        # items may hold non-strings: the built-in appends its "Add network to prompt" weight as a float
        positional, named = split_items([str(x) for x in items])
        try:
            req = parse_args(positional, named, default=default, presets=presets, element_presets=element_presets)
        except ParamError as e:
            messages.append(str(e))
            continue
        requests.append(req)  # its warnings reach the user through Runtime.activate
    return requests, messages


def parse_prompt(prompt: str, default: float = 1.0, presets: Mapping[str, str] | None = None,
                 errors: list[str] | None = None,
                 element_presets: Mapping[str, str] | None = None) -> tuple[str, list[LoraRequest]]:
    """Strip lora/lyco tokens from a prompt (for the CLI); the WebUI does this itself.

    A token whose arguments are unusable raises ParamError, or, with ``errors``, is dropped
    and its message appended there.
    """
    found: list[LoraRequest] = []

    def take(m: re.Match) -> str:
        if m.group(1) not in NETWORK_TYPES:
            return m.group(0)
        try:
            found.append(parse_args(*split_items(m.group(2).split(":")), default=default, presets=presets,
                                    element_presets=element_presets))
        except ParamError as e:
            if errors is None:
                raise
            errors.append(str(e))
        return ""

    return _TOKEN.sub(take, prompt), found


_EMPHASIS = str.maketrans({c: "\\" + c for c in "\\()[]"})


def literal_caption(text: str) -> str:
    """A caption as plain text for the WebUI's prompt parser, which reads ``(tag)`` as emphasis.

    kohya reads captions literally, so booru tags such as ``hatsune miku (vocaloid)`` train on
    their parentheses; escaped, the WebUI's encoder sees the same tokens, all at weight 1.
    """
    return text.translate(_EMPHASIS)
