"""WebUI prompt syntax: the ``<lora:name:te:unet:dyn>`` token, parsed the way the WebUI does,
and escaping text that must reach the WebUI's prompt parser literally."""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"<(\w+):([^>]+)>")
NETWORK_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class LoraRequest:
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None


class ParamError(ValueError):
    pass


def parse_args(positional: list[str], named: dict[str, str], default: float = 1.0) -> LoraRequest:
    """Positional: name, te, unet, dyn. ``unet`` defaults to ``te``; named values win."""
    if not positional or not positional[0].strip():
        raise ParamError("lora token without a name")
    name = positional[0].strip()

    def num(value: str, what: str, cast=float):
        try:
            return cast(value)
        except ValueError:
            raise ParamError(f"<lora:{name}>: {what}={value!r} is not a number") from None

    te = num(positional[1], "te") if len(positional) > 1 and positional[1] != "" else default
    unet = num(positional[2], "unet") if len(positional) > 2 and positional[2] != "" else te
    dyn = num(positional[3], "dyn", int) if len(positional) > 3 and positional[3] != "" else None
    if "te" in named:
        te = num(named["te"], "te")
        if "unet" not in named and len(positional) <= 2:
            unet = te
    if "unet" in named:
        unet = num(named["unet"], "unet")
    if "dyn" in named:
        dyn = num(named["dyn"], "dyn", int)
    return LoraRequest(name, te, unet, dyn)


def split_items(items: list[str]) -> tuple[list[str], dict[str, str]]:
    positional, named = [], {}
    for item in items:
        k, sep, v = item.partition("=")
        if sep and k.strip() in ("te", "unet", "dyn"):
            named[k.strip()] = v.strip()
        else:
            positional.append(item)
    return positional, named


def parse_prompt(prompt: str, default: float = 1.0) -> tuple[str, list[LoraRequest]]:
    """Strip lora/lyco tokens from a prompt (for the CLI); the WebUI does this itself."""
    found: list[LoraRequest] = []

    def take(m: re.Match) -> str:
        if m.group(1) not in NETWORK_TYPES:
            return m.group(0)
        found.append(parse_args(*split_items(m.group(2).split(":")), default=default))
        return ""

    return _TOKEN.sub(take, prompt), found


_EMPHASIS = str.maketrans({c: "\\" + c for c in "\\()[]"})


def literal_caption(text: str) -> str:
    """A caption as plain text for the WebUI's prompt parser, which reads ``(tag)`` as emphasis.

    kohya reads captions literally, so booru tags such as ``hatsune miku (vocaloid)`` train on
    their parentheses; escaped, the WebUI's encoder sees the same tokens, all at weight 1.
    """
    return text.translate(_EMPHASIS)
