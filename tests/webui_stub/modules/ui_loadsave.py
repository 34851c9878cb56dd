"""Stub of modules/ui_loadsave.py (WebUI v1.10.1): saved defaults of the UI's components (ui-config.json).

When the UI is built, the WebUI walks each tab's layout and keys every labelled component (and every
button, by its text) as "<tab id>/<label>/<field>"; layout blocks add nothing to the key.  The first
component with a key records its value under it; each later one with the same key, in the same
start or the next (the file keeps them), gets the recorded value instead of its own, if it is one of
its choices (Radio, Dropdown; every entry of a multiselect's) — a Number's as a float, a Textbox's
as text.  The fields are ``visible`` (of a visible component) and ``value``.  A component with
``do_not_save_to_config`` set is left out.
"""
from __future__ import annotations

from typing import Any

LAYOUT = ("Blocks", "Row", "Column", "Accordion", "Group", "Tab", "Tabs", "TabItem")
TRACKED = ("Radio", "Checkbox", "Textbox", "Number", "Dropdown", "Button", "Slider")


def _choices(comp: Any) -> list:
    return [c[0] if isinstance(c, tuple) else c for c in (getattr(comp, "choices", None) or [])]


class UiLoadsave:
    def __init__(self, filename: str | None = None, settings: dict | None = None):
        self.filename = filename
        self.ui_settings: dict[str, Any] = dict(settings or {})

    def add_block(self, x: Any, path: str = "") -> None:
        kind = type(x).__name__
        if kind in LAYOUT:
            for c in x.children:
                self.add_block(c, path)
        elif getattr(x, "label", None) is not None:
            self.add_component(f"{path}/{x.label}", x)
        elif kind == "Button" and getattr(x, "value", None) is not None:
            self.add_component(f"{path}/{x.value}", x)

    def add_component(self, path: str, x: Any) -> None:
        kind = type(x).__name__
        if kind not in TRACKED or getattr(x, "do_not_save_to_config", False):
            return

        def check(val: Any) -> bool:
            if kind == "Radio":
                return val in _choices(x)
            if kind == "Dropdown":
                return all(v in _choices(x) for v in val) if getattr(x, "multiselect", False) else val in _choices(x)
            return True

        fields = (["visible"] if getattr(x, "visible", True) is not False else []) + \
            (["value"] if kind != "Button" else [])
        for field in fields:
            key = f"{path}/{field}"
            saved = self.ui_settings.get(key)
            if saved is None:
                own = getattr(x, field, None)
                self.ui_settings[key] = own if own is not None or field != "visible" else True
                continue
            if field == "value" and not check(saved):
                continue
            if field == "value" and kind == "Textbox":
                saved = str(saved)
            elif field == "value" and kind == "Number":
                saved = float(saved)
            setattr(x, field, saved)
