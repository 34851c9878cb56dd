"""The WebUI's infotext: ``Lora hashes: "name: 0123456789ab, other: ..."`` written and read like the built-in
Lora, and the whole generation-parameters text the command line writes into its PNGs."""
from __future__ import annotations

import json
import re

from .library import Library, prompt_name

KEY = "Lora hashes"


def format_hashes(pairs: list[tuple[str, str]]) -> str:
    """(name as written in the prompt, 12-hex short hash) pairs -> infotext value."""
    out = []
    for name, h in pairs:
        if not h:
            continue
        clean = name.replace(":", "").replace(",", "")
        out.append(f"{clean}: {h}")
    return ", ".join(out)


def parse_hashes(value: str) -> dict[str, str]:
    value = value.strip().strip('"')
    out: dict[str, str] = {}
    for part in value.split(","):
        name, sep, h = part.rpartition(":")
        if sep and name.strip() and h.strip():
            out[name.strip()] = h.strip()
    return out


def rename_in_prompt(prompt: str, hashes: dict[str, str], lookup) -> str:
    """Point ``<lora:NAME:`` tokens at the local file whose hash matches the infotext.

    ``lookup(shorthash) -> local name or None``; unknown hashes leave the prompt as is.
    """
    def repl(m: re.Match) -> str:
        kind, name = m.group(1), m.group(2)
        h = hashes.get(name)
        local = lookup(h) if h else None
        return f"<{kind}:{local}:" if local else m.group(0)

    return re.sub(r"<(lora|lyco):([^:>]+):", repl, prompt)


_ADDNET_HASH = re.compile(r"^(.*?)\s*\([0-9a-fA-F]+\)$")


def addnet_tokens(params: dict) -> list[str]:
    """``<lora:NAME:W>`` for each LoRA of an infotext written by the sd-webui-additional-networks extension
    (``AddNet Module N: LoRA``, ``AddNet Model N: NAME(hash)``, ``AddNet Weight A N: W``), as the built-in Lora
    turns them into prompt tokens on paste (the hash in brackets is dropped; the weight defaults to 1.0)."""
    out = []
    for key in params:
        if not key.startswith("AddNet Model "):
            continue
        n = key[len("AddNet Model "):]
        name = params.get(key)
        if params.get(f"AddNet Module {n}") != "LoRA" or not isinstance(name, str) or not name.strip():
            continue
        m = _ADDNET_HASH.match(name.strip())
        weight = params.get(f"AddNet Weight A {n}", "1.0")
        out.append(f"<lora:{m.group(1) if m else name.strip()}:{weight}>")
    return out


def _quote(value: object) -> str:
    """A value as the WebUI writes it in the last line: JSON-quoted when it holds ',', ':' or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, negative: str, fields: dict[str, object]) -> str:
    """The WebUI's generation parameters ("infotext"): the prompt, ``Negative prompt: …`` when there is
    one, then ``Key: value`` pairs joined by ", " (None values left out), e.g. ``Steps: 20, Sampler: DDIM,
    CFG scale: 7.0, Seed: 1, Size: 512x512, Model hash: 0123456789, Lora hashes: "a: 0123456789ab"``."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image, path, parameters: str) -> None:
    """Write a PIL image as PNG with ``parameters`` in a "parameters" text chunk, where the WebUI keeps it
    (its PNG Info tab and "Send to txt2img" read it back)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def paste_rename(prompt: str, hashes_value: str, library: Library, prefer_filename: bool = False) -> str:
    """Point ``<lora:NAME:`` tokens of a pasted prompt at local files, by the infotext's hashes.

    A name that already resolves to a file with the right hash is kept; otherwise the file
    with that hash is looked up (hashing the library once if needed) and named as a card would name it
    (``prefer_filename``: the built-in's ``lora_preferred_name`` is "Filename").
    """
    hashes = parse_hashes(hashes_value)
    if not hashes:
        return prompt

    def lookup_for(name: str):
        def lookup(shorthash: str) -> str | None:
            try:
                current = library.resolve(name)
                if current.addnet_hash().startswith(shorthash.lower()):
                    return None  # already right: leave the token as written
            except (LookupError, OSError):
                pass
            found = library.by_hash(shorthash)
            return prompt_name(library, found, prefer_filename) if found is not None else None
        return lookup

    out = prompt
    for name in hashes:
        out = rename_in_prompt(out, {name: hashes[name]}, lookup_for(name))
    return out
