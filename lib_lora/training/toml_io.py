"""TOML text in and out, for kohya's ``config.toml`` and ``dataset.toml``.

Reading uses Python 3.11's ``tomllib``, or the ``toml`` package on older Pythons (install.py adds
it there: the WebUI 1.10 runs Python 3.10).  Writing needs no package: the files hold tables of
strings, numbers, booleans and lists of them, and arrays of such tables (``[[datasets]]``), which
``dumps`` writes in the layout kohya's own documentation uses.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import RequestError

__all__ = ["loads", "load", "dumps", "TomlError"]


class TomlError(RequestError):
    """The text is not TOML (or its values cannot be written as TOML)."""


def loads(text: str, where: str = "TOML") -> dict[str, Any]:
    """Parse TOML text; ``where`` names it in the error (a file name, or "config_toml")."""
    try:
        import tomllib
        return tomllib.loads(text)
    except ImportError:
        pass
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise TomlError(f"{where}: not valid TOML: {e}") from None
    try:
        import toml
    except ImportError:
        raise TomlError(f"{where}: reading TOML needs Python 3.11 or the 'toml' package (pip install toml)") \
            from None
    try:
        return toml.loads(text)
    except (toml.TomlDecodeError, IndexError, TypeError) as e:
        raise TomlError(f"{where}: not valid TOML: {e}") from None


def load(path: str | Path) -> dict[str, Any]:
    """A TOML file, or a JSON one when its name ends in .json (kohya reads both for --dataset_config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TomlError(f"{path}: cannot read it ({e.strerror or e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise TomlError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise TomlError(f"{path}: expected a JSON object")
        return data
    return loads(text, str(path))


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TomlError(f"{where}: {value} cannot be written as TOML")
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v, where) for v in value) + "]"
    raise TomlError(f"{where}: a {type(value).__name__} cannot be written as TOML")


def _table(data: dict[str, Any], where: str) -> list[str]:
    return [f"{_key(k)} = {_scalar(v, f'{where}.{k}')}" for k, v in data.items() if v is not None
            and not isinstance(v, dict) and not _is_tables(v)]


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def dumps(data: dict[str, Any]) -> str:
    """TOML text for ``data``: top-level values, then tables (``[name]``), then arrays of tables
    (``[[name]]``, nested ones indented as in kohya's examples).  None values are left out, as
    TOML has no null."""
    lines = _table(data, "")
    for name, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{_key(name)}]"] + _table(value, name)
    for name, value in data.items():
        if _is_tables(value):
            for i, entry in enumerate(value):
                lines += _array_entry(f"{_key(name)}", entry, f"{name}[{i}]", "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _array_entry(path: str, entry: dict[str, Any], where: str, indent: str) -> list[str]:
    lines = ["", f"{indent}[[{path}]]"] + [indent + line for line in _table(entry, where)]
    for name, value in entry.items():
        if isinstance(value, dict):
            raise TomlError(f"{where}.{name}: a table inside an array of tables is not written here")
        if _is_tables(value):
            for i, sub in enumerate(value):
                lines += _array_entry(f"{path}.{_key(name)}", sub, f"{where}.{name}[{i}]", indent + "  ")
    return lines
