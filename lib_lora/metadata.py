"""Reading a LoRA's training metadata (kohya's ``ss_*``, modelspec) for cards, the API and the CLI:
a summary, tag and bucket counts, the algorithm.  Metadata only: no tensor is read."""
from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from typing import Any

from . import safe_json

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
    ({"buckets": {i: {"resolution": [w, h], "count": n}}, ...}), or summed over the datasets of
    ``ss_datasets`` (a dataset config's file has no ss_bucket_info); most used first; [] when absent."""
    data = _json_value(meta.get("ss_bucket_info"))
    infos = [data] if "ss_bucket_info" in meta else \
        [d.get("bucket_info") for d in _json_value(meta.get("ss_datasets")) or () if isinstance(d, dict)]
    counts: dict[str, int] = {}
    for info in infos:
        buckets = info.get("buckets") if isinstance(info, dict) else None
        _count(buckets, counts)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _count(buckets: Any, counts: dict[str, int]) -> None:
    for b in buckets.values() if isinstance(buckets, dict) else ():
        try:
            w, h = (int(x) for x in b["resolution"])
            counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + int(b["count"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue  # one malformed bucket does not hide the others


def datasets_resolution(meta: Mapping[str, Any]) -> str | None:
    """The resolutions in kohya's ``ss_datasets`` (written instead of ss_resolution when a dataset
    config is trained), as ss_resolution spells one: "(512, 512), (768, 768)"; None without them."""
    data = _json_value(meta.get("ss_datasets"))
    sizes: list[str] = []
    for d in data if isinstance(data, list) else ():
        reso = d.get("resolution") if isinstance(d, dict) else None
        if isinstance(reso, list) and len(reso) == 2 and all(isinstance(x, int) for x in reso):
            sizes.append(f"({reso[0]}, {reso[1]})")
    return ", ".join(dict.fromkeys(sizes)) or None


def metadata_summary(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The training facts worth showing first, as (label, text); raw values, not HTML-escaped."""
    rows: list[tuple[str, str]] = []
    for key, label in _SUMMARY_KEYS:
        v = meta.get(key)
        if key == "ss_resolution" and v is None:
            v = datasets_resolution(meta)
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
