"""A recording stand-in for the part of gradio 3.41's API that the LoRA Workshop tab uses.

The WebUI's gradio (3.41.2) cannot be installed beside this project's test environment (it pins
numpy<2), so tests install this module as ``gradio`` to build the tab.  Each component accepts
only the keyword arguments gradio 3.41.2's own signature has and the positional one it takes first
(checked against the WebUI's gradio; gradio 3.41 merely warns "unused kwarg" and ignores any other, so a
gradio-4-only argument silently does nothing in the WebUI: here it fails), places itself in the layout block that is open, and each
event listener records (fn, inputs, outputs), so a test can call a handler the way gradio would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

_COMMON = {"visible", "elem_id", "elem_classes"}
_FORM = _COMMON | {"label", "info", "every", "show_label", "container", "scale", "min_width", "interactive"}
# keyword arguments of gradio 3.41.2's constructors (besides the first positional one)
SIGNATURES: dict[str, set[str]] = {
    "Blocks": {"theme", "analytics_enabled", "mode", "title", "css"},
    "Row": _COMMON | {"variant", "equal_height"},
    "Column": _COMMON | {"scale", "min_width", "variant"},
    "Accordion": _COMMON | {"label", "open"},
    "Group": _COMMON,
    "Markdown": _COMMON | {"value", "rtl", "latex_delimiters"},
    "HTML": _COMMON | {"value", "label", "every", "show_label"},
    "Button": _COMMON | {"value", "variant", "size", "icon", "link", "interactive", "scale", "min_width"},
    "Textbox": _FORM | {"value", "lines", "max_lines", "placeholder", "autofocus", "type",
                        "text_align", "rtl", "show_copy_button"},
    "Number": _FORM | {"value", "precision", "minimum", "maximum", "step"},
    "Checkbox": _FORM | {"value"},
    "Dropdown": _FORM | {"choices", "value", "type", "multiselect", "allow_custom_value", "max_choices"},
    "Radio": _FORM | {"choices", "value", "type"},
    "Image": _FORM | {"value", "shape", "height", "width", "image_mode", "invert_colors", "source", "tool", "type",
                      "streaming", "mirror_webcam", "brush_radius", "brush_color", "mask_opacity",
                      "show_share_button", "show_download_button"},
    "Gallery": _COMMON | {"value", "label", "every", "show_label", "container", "scale", "min_width", "columns",
                          "rows", "height", "preview", "object_fit", "allow_preview", "show_share_button",
                          "show_download_button"},
    "State": {"value"},
    "File": _FORM | {"value", "file_count", "file_types", "type", "height"},
}
# the parameter a first positional argument is (None: keyword-only)
POSITIONAL = {"Blocks": "theme", "Row": None, "Column": None, "Group": None, "Accordion": "label",
              "Dropdown": "choices", "Radio": "choices"}
LISTENER = {"api_name", "status_tracker", "scroll_to_output", "show_progress", "queue", "batch", "max_batch_size",
            "preprocess", "postprocess", "cancels", "every", "_js"}
SHOW_PROGRESS = ("full", "minimal", "hidden")
_open: list["Block"] = []


@dataclass
class Event:
    name: str
    fn: Callable[..., Any]
    inputs: list
    outputs: list
    options: dict = field(default_factory=dict)


class Block:
    def __init__(self, *args: Any, **kwargs: Any):
        kind = type(self).__name__
        unknown = set(kwargs) - SIGNATURES[kind]
        first = POSITIONAL.get(kind, "value")
        if unknown or len(args) > (1 if first else 0):
            raise TypeError(f"gradio 3.41 {kind}() takes no {sorted(unknown) or 'positional argument here'}")
        if args:
            kwargs = {first: args[0], **kwargs}
        self.kwargs = kwargs
        self.children: list[Block] = []
        self.events: list[Event] = []
        self.parent = _open[-1] if _open else None
        if self.parent is not None:
            self.parent.children.append(self)

    def __getattr__(self, name: str) -> Any:
        if name in ("kwargs", "children", "events", "parent"):
            raise AttributeError(name)
        return self.kwargs.get(name)

    def __enter__(self) -> "Block":
        _open.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _open.pop()

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def _listen(self, name: str, fn: Callable[..., Any], inputs: Any = None, outputs: Any = None, **kw: Any) -> None:
        unknown = set(kw) - LISTENER
        if unknown:
            raise TypeError(f"gradio 3.41 .{name}() takes no {sorted(unknown)}")
        if kw.get("show_progress", "full") not in SHOW_PROGRESS:
            raise ValueError(f"show_progress must be one of {SHOW_PROGRESS}")
        as_list = lambda x: [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
        self.events.append(Event(name, fn, as_list(inputs), as_list(outputs), kw))

    def click(self, fn, inputs=None, outputs=None, **kw):
        self._listen("click", fn, inputs, outputs, **kw)

    def change(self, fn, inputs=None, outputs=None, **kw):
        self._listen("change", fn, inputs, outputs, **kw)

    def upload(self, fn, inputs=None, outputs=None, **kw):  # File's (Uploadable)
        self._listen("upload", fn, inputs, outputs, **kw)


def _block(name: str) -> type:
    return type(name, (Block,), {})


Blocks, Row, Column, Accordion, Group = (_block(n) for n in ("Blocks", "Row", "Column", "Accordion", "Group"))
Markdown, HTML, Button, Textbox, Number = (_block(n) for n in ("Markdown", "HTML", "Button", "Textbox", "Number"))
Checkbox, Dropdown, Radio, Image, Gallery, State, File = (_block(n) for n in ("Checkbox", "Dropdown", "Radio", "Image",
                                                                           "Gallery", "State", "File"))


def update(**kwargs: Any) -> dict:
    return {"__type__": "update", **kwargs}


def find(root: Block, elem_id: str) -> Block:
    """The component with ``elem_id`` below ``root``."""
    hits = [b for b in root.walk() if b.kwargs.get("elem_id") == elem_id]
    assert len(hits) == 1, f"{len(hits)} components with elem_id {elem_id}"
    return hits[0]
