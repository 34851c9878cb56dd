"""What an extra-networks card shows for a LoRA file: its name, the prompt a click inserts, its
family badge and search terms.  Host-independent; ``hosts/webui.py`` wraps it in the WebUI's page."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import families
from .fit import Fit, FitCache
from .library import Entry
from .modelmap import ModelMap


def format_weight(w: float) -> str:
    return f"{float(w):g}"


def display_names(entries: Sequence[Entry]) -> dict[str, str]:
    """Card names: the file stem, or the sub-folder path where stems collide (cards are keyed by name)."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name.lower()] = counts.get(e.name.lower(), 0) + 1
    return {e.relname: e.name if counts[e.name.lower()] == 1 else e.relname for e in entries}


def card_prompts(name: str, user_meta: Mapping[str, Any], default_weight: float) -> tuple[str, str]:
    """(prompt, negative prompt) a card click inserts, from the built-in's user-notes fields."""
    try:
        weight = float(user_meta.get("preferred weight") or 0.0)
    except (TypeError, ValueError):
        weight = 0.0
    prompt = f"<lora:{name}:{format_weight(weight or default_weight)}>"
    activation = str(user_meta.get("activation text") or "").strip()
    if activation:
        prompt += " " + activation
    negative = str(user_meta.get("negative text") or "").strip()
    return prompt, (f"({negative}:1)" if negative else "")


FITS, NO_FIT = "fits loaded model", "does not fit"


@dataclass(frozen=True)
class CardFamily:
    """What a card says about a file's model family."""
    family: str | None   # sd1/sd2/sdxl/sd3 from metadata, else from the keys; None: neither says
    badge: str           # "SDXL", "unknown", or FITS / NO_FIT for files that name no family
    compatible: bool     # False: made for another family, or does not fit the loaded model
    fit: Fit | None = None  # the shape check, for files that name no family while a model is loaded

    def sort_keys(self) -> dict[str, str]:
        """The card's data-sort-* attributes: the badge (style.css) and its tooltip (javascript/)."""
        keys = {"lwfamily": self.badge, "lwcompat": "yes" if self.compatible else "no"}
        if self.fit is not None:
            keys["lwfit"] = (f"{self.fit.total} layers, all in the loaded model" if self.fit.fits else
                             f"{self.fit.matched - self.fit.mismatched} of {self.fit.total} layers fit: "
                             f"{self.fit.example}")
        return keys


def card_family(entry: Entry, mm: ModelMap | None, fits: FitCache) -> CardFamily:
    """The family from metadata; else from the header's keys and widths; else, with a model loaded,
    whether the file's layers fit it (a file that names no family applies where it fits)."""
    current = mm.family if mm is not None else None
    family = entry.family
    if family is not None:
        return CardFamily(family, families.display(family), current is None or family == current)
    verdict = fits.fit(entry, mm) if mm is not None else None
    if verdict is None:
        return CardFamily(None, families.display(None), True)
    return CardFamily(None, FITS if verdict.fits else NO_FIT, verdict.fits, verdict)


def card_search_terms(entry: Entry) -> list[str]:
    terms = [entry.relpath, entry.name, entry.alias, families.display(entry.family)]
    h = entry.known_hash()
    if h:
        terms.append(h[:12])
    seen: list[str] = []
    for t in terms:
        if t and t not in seen:
            seen.append(t)
    return seen
