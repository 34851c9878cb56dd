"""Host-independent pieces of the WebUI integration: prompt tokens, cards, API payloads, paste.

Everything here works on Library entries and plain data so it can be tested without the
WebUI; ``hosts/webui.py`` only wraps it in the WebUI's classes.
"""
from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import families, safe_json
from .fit import Fit, FitCache
from .infotext import parse_hashes, rename_in_prompt
from .library import Entry, Library
from .modelmap import ModelMap
from .params import LoraRequest, ParamError, parse_args, split_items

# -- prompt tokens ---------------------------------------------------------------------------


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


def format_weight(w: float) -> str:
    return f"{float(w):g}"


# -- metadata --------------------------------------------------------------------------------

_SUMMARY_KEYS = (
    ("ss_output_name", "Output name"), ("ss_sd_model_name", "Trained on"), ("ss_base_model_version", "Base version"),
    ("modelspec.architecture", "Architecture"), ("ss_network_module", "Network module"), ("ss_network_dim", "Rank"),
    ("ss_network_alpha", "Alpha"), ("ss_network_args", "Network args"), ("ss_resolution", "Resolution"),
    ("ss_clip_skip", "Clip skip"), ("ss_num_train_images", "Training images"), ("ss_num_epochs", "Epochs"),
    ("ss_max_train_steps", "Steps"), ("ss_learning_rate", "Learning rate"), ("ss_training_comment", "Comment"),
)


def decoded_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with JSON-object values decoded, the way the WebUI presents safetensors metadata."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = safe_json.loads(v)
            except ValueError:  # out-of-range numbers, NaN, deep nesting: shown as the raw string
                pass
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return safe_json.loads(v)
        except ValueError:
            return None
    return v


def tag_frequency(meta: Mapping[str, Any], top: int | None = None) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` ({dataset dir: {tag: count}}) summed over dirs, most frequent first."""
    data = _json_value(meta.get("ss_tag_frequency"))
    counts: dict[str, int] = {}
    if isinstance(data, dict):
        for tags in data.values():
            if not isinstance(tags, dict):
                continue
            for tag, n in tags.items():
                tag = str(tag).strip()
                try:
                    counts[tag] = counts.get(tag, 0) + int(n)
                except (TypeError, ValueError, OverflowError):
                    continue
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ordered[:top] if top is not None else ordered


def bucket_counts(meta: Mapping[str, Any]) -> list[tuple[str, int]]:
    """("WxH", images x repeats) per training size, from kohya's ``ss_bucket_info``
    ({"buckets": {i: {"resolution": [w, h], "count": n}}, ...}), most used first; [] when absent."""
    data = _json_value(meta.get("ss_bucket_info"))
    buckets = data.get("buckets") if isinstance(data, dict) else None
    counts: dict[str, int] = {}
    for b in buckets.values() if isinstance(buckets, dict) else ():
        try:
            w, h = (int(x) for x in b["resolution"])
            counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + int(b["count"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue  # one malformed bucket does not hide the others
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def metadata_summary(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The training facts worth showing first, as (label, text); raw values, not HTML-escaped."""
    rows: list[tuple[str, str]] = []
    for key, label in _SUMMARY_KEYS:
        v = meta.get(key)
        if v is None or str(v) in ("", "None"):
            continue
        rows.append((label, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
        if key == "ss_resolution":
            buckets = bucket_counts(meta)
            if buckets:
                more = ", ..." if len(buckets) > 8 else ""
                rows.append(("Buckets", ", ".join(f"{size} ({n})" for size, n in buckets[:8]) + more))
    started = meta.get("ss_training_started_at")
    try:
        when = datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc)
        rows.append(("Trained", when.strftime("%Y-%m-%d %H:%M UTC")))
    except (TypeError, ValueError, OverflowError, OSError):
        pass
    return rows


_MODULE_ALGOS = {"networks.lora": "lora", "networks.dylora": "dylora", "networks.oft": "oft",
                 "lycoris.kohya": "locon"}


def algorithm_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Algorithm, rank and alpha as the training metadata states them (None when unknown).

    Metadata only: the tensors are not read, so this is cheap for a whole library.  A value
    that is not a finite number (``"1e400"``, ``"abc"``) is given as the raw string.
    """
    args = _json_value(meta.get("ss_network_args"))
    algo = args.get("algo") if isinstance(args, dict) else None
    if not isinstance(algo, str) or not algo:
        algo = _MODULE_ALGOS.get(str(meta.get("ss_network_module", "")))
    if not algo:
        arch = str(meta.get("modelspec.architecture", ""))
        algo = arch.rpartition("/")[2] or None if "/" in arch else None

    def num(key: str, cast):
        """The number, or the text as written when it is not a (finite) number."""
        raw = meta.get(key)
        if raw is None or str(raw) in ("", "None"):
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return str(raw)
        return cast(value) if math.isfinite(value) else str(raw)

    return {"algorithm": algo, "rank": num("ss_network_dim", int), "alpha": num("ss_network_alpha", float)}


# -- entries ---------------------------------------------------------------------------------


def relpath(entry: Entry) -> str:
    """Path below its LoRA folder, with extension, '/'-separated (never absolute)."""
    return entry.path.relative_to(entry.root).as_posix()


def entry_json(entry: Entry, detail: bool = False) -> dict[str, Any]:
    """One LoRA for ``/lora-workshop/v1/loras``; ``detail`` adds file hashes, notes and tags."""
    out: dict[str, Any] = {
        "name": entry.name,
        "alias": entry.alias,
        "path": relpath(entry),
        "family": entry.family,
        **algorithm_info(entry.metadata),
        "size": entry.size,
        "mtime": entry.mtime,
        "hashes": {"addnet": entry.known_hash()},
        "metadata": dict(entry.metadata),
    }
    if entry.header_error:
        out["error"] = entry.header_error
    if detail:
        out["hashes"] = {"addnet": entry.addnet_hash(), "shorthash": entry.shorthash(), "sha256": entry.sha256(),
                         "autov2": entry.sha256()[:10]}
        try:
            out["user_metadata"] = entry.user_metadata()
        except Exception as e:  # an unreadable notes file must not hide the LoRA
            out["user_metadata"] = {}
            out["user_metadata_error"] = str(e)
        out["tag_frequency"] = dict(tag_frequency(entry.metadata, top=100))
        preview = entry.preview()
        out["preview"] = preview.relative_to(entry.root).as_posix() if preview else None
    return out


def builtin_json(entry: Entry) -> dict[str, Any]:
    """The built-in Lora extension's ``/sdapi/v1/loras`` item: name, alias, absolute path, metadata."""
    return {"name": entry.name, "alias": entry.alias, "path": str(entry.path), "metadata": decoded_metadata(entry.metadata)}


def _resolves_to(library: Library, name: str, entry: Entry) -> bool:
    try:
        return library.resolve(name) is entry
    except LookupError:
        return False


_TOKEN_UNSAFE = re.compile(r"[:<>]")


def prompt_name(library: Library, entry: Entry, prefer_filename: bool = False) -> str:
    """The shortest name that a ``<lora:NAME:...>`` token resolves back to exactly this file."""
    candidates = [entry.name, entry.alias] if prefer_filename else [entry.alias, entry.name]
    for c in [*candidates, entry.relname]:
        if c and not _TOKEN_UNSAFE.search(c) and _resolves_to(library, c, entry):
            return c
    return entry.relname


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
    terms = [relpath(entry), entry.name, entry.alias, families.display(entry.family)]
    h = entry.known_hash()
    if h:
        terms.append(h[:12])
    seen: list[str] = []
    for t in terms:
        if t and t not in seen:
            seen.append(t)
    return seen


# -- infotext --------------------------------------------------------------------------------


def paste_rename(prompt: str, hashes_value: str, library: Library) -> str:
    """Point ``<lora:NAME:`` tokens of a pasted prompt at local files, by the infotext's hashes.

    A name that already resolves to a file with the right hash is kept; otherwise the file
    with that hash is looked up (hashing the library once if needed).
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
            return prompt_name(library, found) if found is not None else None
        return lookup

    out = prompt
    for name in hashes:
        out = rename_in_prompt(out, {name: hashes[name]}, lookup_for(name))
    return out


__all__ = [
    "requests_from_items", "format_weight", "decoded_metadata", "tag_frequency",
    "metadata_summary", "bucket_counts", "algorithm_info", "relpath", "entry_json", "builtin_json",
    "prompt_name", "display_names",
    "card_prompts", "card_search_terms", "paste_rename",
]
