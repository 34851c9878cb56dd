"""What an extra-networks card shows for a LoRA file: its name, the prompt a click inserts, its
family badge (or the one its notes state), whether the page hides it, and search terms.
Host-independent; ``hosts/webui_cards.py`` wraps it in the WebUI's page."""
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


@dataclass(frozen=True)
class CardPrompt:
    """What a card click inserts, from the built-in's user-notes fields."""
    name: str             # the token's name
    weight: float | None  # the notes' preferred weight; None: the host's default multiplier
    activation: str       # added after the token ("" for none)
    negative: str         # the negative prompt's addition, "(text:1)" or ""

    @property
    def tail(self) -> str:
        """What follows the token: a space and the activation text, if any."""
        return f" {self.activation}" if self.activation else ""

    def text(self, weight: str) -> str:
        """The prompt with the token's weight spelt ``weight`` (the preferred one's, or the host's default)."""
        return f"<lora:{self.name}:{weight}>{self.tail}"


def card_prompt(name: str, user_meta: Mapping[str, Any]) -> CardPrompt:
    try:
        weight = float(user_meta.get("preferred weight") or 0.0)
    except (TypeError, ValueError):
        weight = 0.0
    activation = str(user_meta.get("activation text") or "").strip()
    negative = str(user_meta.get("negative text") or "").strip()
    # 0 (the editor's "none") or unreadable: the default, as the built-in's cards do
    return CardPrompt(name, weight or None, activation, f"({negative}:1)" if negative else "")


# the notes' "sd version" (the built-in's key and spellings, plus SD3); "Unknown" leaves it to the file
NOTES_VERSION_KEY = "sd version"
UNKNOWN_VERSION = "Unknown"
SD_VERSIONS = ("SD1", "SD2", "SDXL", "SD3", UNKNOWN_VERSION)


def stated_family(user_meta: Mapping[str, Any]) -> str | None:
    """The family the notes' "sd version" names (exact spellings, as the built-in reads them), or None."""
    value = user_meta.get(NOTES_VERSION_KEY) if isinstance(user_meta, Mapping) else None
    return next((f for f in families.FAMILIES if isinstance(value, str) and value == families.display(f)), None)


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


def card_family(entry: Entry, mm: ModelMap | None, fits: FitCache, stated: str | None = None) -> CardFamily:
    """The family the notes state (``stated_family``), else the file's metadata, else the header's keys
    and widths; else, with a model loaded, whether the file's layers fit it (a file that names no
    family applies where it fits)."""
    current = mm.family if mm is not None else None
    family = stated or entry.family
    if family is not None:
        return CardFamily(family, families.display(family), current is None or family == current)
    verdict = fits.fit(entry, mm) if mm is not None else None
    if verdict is None:
        return CardFamily(None, families.display(None), True)
    return CardFamily(None, FITS if verdict.fits else NO_FIT, verdict.fits, verdict)


def card_hidden(fam: CardFamily, loaded: str | None, show_all: bool, hide_unknown_for: Any) -> bool:
    """Whether the cards page leaves a card out, by the built-in's two settings: ``show_all``
    (``lora_show_all``) shows every card; otherwise, with a model loaded, cards for another family
    are hidden, and so are files that name no family and do not fit it; those that fit (or cannot
    be checked) are hidden when the loaded family's name ("SD1", "SD2", "SDXL") is in
    ``hide_unknown_for`` (``lora_hide_unknown_for_versions``, a list of names)."""
    if show_all or loaded is None:
        return False
    if fam.family is None and families.display(loaded) in _names(hide_unknown_for):
        return True
    return not fam.compatible


def _names(value: Any) -> set[str]:
    """A multi-choice setting's names: a list as the WebUI stores it, or a comma-separated string."""
    if isinstance(value, str):
        return {x.strip() for x in value.split(",") if x.strip()}
    return {str(x) for x in value or ()}


def card_search_terms(entry: Entry, family: str | None = None) -> list[str]:
    """Path, name, alias, family (``family``: the card's, where the notes state one) and short hash."""
    terms = [entry.relpath, entry.name, entry.alias, families.display(family or entry.family)]
    h = entry.known_hash()
    if h:
        terms.append(h[:12])
    seen: list[str] = []
    for t in terms:
        if t and t not in seen:
            seen.append(t)
    return seen
