"""``Lora hashes: "name: 0123456789ab, other: ..."`` written and read like the built-in Lora."""
from __future__ import annotations

import re

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
