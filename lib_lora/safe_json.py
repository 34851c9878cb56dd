"""JSON text taken from files (metadata values, notes), decoded so that it can be served back.

A file may hold ``1e400``, ``NaN`` or nesting a thousand levels deep; decoded as Python's
``json`` does by default, those become ``inf``/``nan`` (which make an API answer invalid
JSON) or a RecursionError later, wherever the value is used.  ``loads`` refuses them up front.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # kohya's deepest metadata value (ss_bucket_info) has 3 levels


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def loads(text: str) -> Any:
    """Decoded JSON with finite numbers and at most MAX_DEPTH levels; ValueError otherwise."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError("nested too deeply")
    return value
