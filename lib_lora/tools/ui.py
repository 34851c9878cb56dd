"""The "Tools" section of the LoRA Workshop tab (gradio 3.41.x), made from the tools' declarations.

``create_section(runner)`` is the only function that imports gradio; it places one form per tool
(``tools/options.py``: every option offered on the tab, files as pickers of the host's LoRA and
checkpoint names), a tool selector, a Run button and the status of the newest jobs.  Run hands
the form to ``ToolRunner.start`` as the API would (the same names, the same checks), so the tab
never writes anywhere the API could not.  javascript/lora_workshop.js clicks the section's
Refresh button every 2 s while it is on screen.
"""
from __future__ import annotations

import html
from typing import Any

from .jobs import ToolJobError, ToolRunner
from .options import REQUIRED, TOOLS, Option
from .progress import clock

POLL_ID = "lora_workshop_tools_poll"
NONE = "(none)"     # a file picker's "no file"


def widget(o: Option) -> str:
    """The form element of an option: lora, loras, checkpoint, text, bool, int, float, choice."""
    if o.kind in ("lora", "loras", "checkpoint"):
        return o.kind
    if o.kind:
        return "text"
    if o.choices:
        return "choice"
    return {bool: "bool", int: "int", float: "float"}.get(o.type, "text")


def choices(o: Option) -> list[str]:
    """A choice option's entries; None shows as its ``none_label``."""
    return ([o.none_label] if o.default is None else []) + list(o.choices)


def start_value(o: Option) -> Any:
    if o.default is None or o.default is REQUIRED:
        return {"choice": o.none_label if o.choices else None, "int": 0, "float": 0,
                "checkpoint": NONE if not o.required else None}.get(widget(o))
    return o.default


def form_to_body(tool_name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The tab's values of one tool (by option name) as an API body.

    Not set: an empty text or picker, a "none" choice, and 0 in a number whose default is none.
    ``loras`` comes with ``loras_weights``: one line per chosen LoRA, in order, holding what follows
    the name in ``<lora:name:...>`` ("0.8", "te=0.5:unet=1", "1:lbw=..."); a missing line is weight 1.
    """
    t = TOOLS[tool_name]
    body: dict[str, Any] = {}
    for o in t.on("tab"):
        v = values.get(o.name)
        kind = widget(o)
        if kind == "loras":
            lines = [ln.strip() for ln in str(values.get(o.name + "_weights") or "").splitlines()]
            names = list(v or [])
            v = [n + (":" + lines[i] if i < len(lines) and lines[i] else "") for i, n in enumerate(names)] or None
        elif kind in ("lora", "checkpoint", "text"):
            v = v.strip() if isinstance(v, str) else v
            v = None if v in ("", NONE) else v
        elif kind == "choice":
            v = None if v in (None, "", o.none_label) and o.default is None else v
        elif kind in ("int", "float"):
            if v in (None, "") or (v == 0 and o.default is None):
                v = None
            elif kind == "int" and isinstance(v, float) and v.is_integer():
                v = int(v)
        if v is None and not o.required:
            continue
        body[o.name] = v
    return body


# -- views ---------------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x))


def status_html(status: dict | None) -> str:
    """A job's tool, output, state, a progress bar with ETA, and its error."""
    if not status:
        return "<div class='lora-workshop-tools-status'><p>No tool job yet.</p></div>"
    total = int(status.get("total") or 0)
    done = int(status.get("done") or 0)
    pct = min(100.0, 100.0 * float(status.get("progress") or 0.0))
    head = f"<b>{_esc(status['tool'])}</b> &rarr; <code>{_esc(status['output'])}</code>: {_esc(status['state'])}"
    if status.get("stage") and status["stage"] not in (status["state"], status["tool"]):
        head += f" ({_esc(status['stage'])})"
    facts = [f"{done}/{total}"] if total else []
    if status.get("eta") is not None:
        facts.append(f"ETA {clock(status['eta'])}")
    if status.get("elapsed"):
        facts.append(f"{clock(status['elapsed'])} elapsed")
    parts = ["<div class='lora-workshop-tools-status'>", f"<p>{head}{' &mdash; ' if facts else ''}"
             f"{_esc(', '.join(facts))}</p>", f"<div class='lw-bar'><div style='width:{pct:.1f}%'></div></div>"]
    if status.get("error"):
        parts.append(f"<p class='lw-error'>{_esc(status['error'])}</p>")
    parts.append("</div>")
    return "".join(parts)


def jobs_html(statuses: list[dict]) -> str:
    """The newest jobs, one line each (the first in full above)."""
    if len(statuses) < 2:
        return ""
    rows = "".join(f"<tr><td>{_esc(s['tool'])}</td><td><code>{_esc(s['output'])}</code></td>"
                   f"<td>{_esc(s['state'])}</td><td>{_esc(s.get('error') or '')}</td></tr>" for s in statuses[1:6])
    return f"<table class='lora-workshop-tools-jobs'><tbody>{rows}</tbody></table>"


def message_html(text: str, error: bool = False) -> str:
    return f"<p class='{'lw-error' if error else 'lw-ok'}'>{_esc(text)}</p>"


def run_from_form(runner: ToolRunner, tool_name: str, values: dict[str, Any]) -> str:
    """Start a job from the tab's values; the message to show (the refusal, or what was queued)."""
    try:
        job = runner.start(tool_name, form_to_body(tool_name, values))
    except ToolJobError as e:
        return message_html(str(e), error=True)
    return message_html(f"Queued {job.tool} -> {job.status()['output']} (job {job.id}).")


def poll(runner: ToolRunner) -> tuple[str, str]:
    """The newest job's status and log, with the recent jobs below it."""
    statuses = [j.status() for j in runner.jobs()]
    newest = statuses[0] if statuses else None
    return status_html(newest) + jobs_html(statuses), "\n".join(newest["log"]) if newest else ""


# -- the section -----------------------------------------------------------------------------------------


def create_section(runner: ToolRunner) -> None:
    """The Tools section, built inside the tab's open ``gr.Blocks`` (gradio 3.41 API)."""
    import gradio as gr

    host = runner.host
    names = list(TOOLS)
    inputs: list[tuple[str, str, Any]] = []        # (tool, value key, component), in the handlers' order
    pickers: list[tuple[str, Any, bool]] = []      # (kind, dropdown, offers "none") the refresh button updates
    groups = []

    def lists() -> dict[str, list[str]]:
        return {"lora": host.loras(), "loras": host.loras(), "checkpoint": host.checkpoints()}

    start_lists = lists()

    def make(t: str, o: Option) -> None:
        eid = f"lora_workshop_tools_{t}_{o.name}"
        label = o.label or o.help
        kind, value = widget(o), start_value(o)
        if kind in ("lora", "checkpoint"):
            entries = ([NONE] if not o.required else []) + start_lists[kind]
            c = gr.Dropdown(label=label, choices=entries, value=value, elem_id=eid)
            pickers.append((kind, c, not o.required))
        elif kind == "loras":
            c = gr.Dropdown(label=label, choices=start_lists[kind], value=[], multiselect=True, elem_id=eid)
            pickers.append((kind, c, False))
            w = gr.Textbox(label="Weights: one line per LoRA, in order (0.8 / te=0.5:unet=1 / 1:lbw=...)",
                           lines=2, elem_id=eid + "_weights")
            inputs.append((t, o.name + "_weights", w))
        elif kind == "bool":
            c = gr.Checkbox(label=label, value=bool(value), elem_id=eid)
        elif kind == "choice":
            c = gr.Dropdown(label=label, choices=choices(o), value=value, elem_id=eid)
        elif kind in ("int", "float"):
            c = gr.Number(label=label, value=value, precision=0 if kind == "int" else None, elem_id=eid)
        else:
            c = gr.Textbox(label=label, value=value or "", elem_id=eid)
        inputs.append((t, o.name, c))

    def unsaved(components: list) -> None:
        # The WebUI saves and restores a tab's values keyed by tab and label (ui-config.json): the tools
        # share labels ("Rank", "Save as"), so the first tool's value would become every later one's
        # default, and a restored tool choice would not match the form shown.
        for c in components:
            c.do_not_save_to_config = True

    with gr.Accordion("Tools: resize, merge, bake, extract, convert", open=False,
                      elem_id="lora_workshop_tools"):
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    selector = gr.Radio(label="Tool", choices=names, value=names[0],
                                        elem_id="lora_workshop_tools_tool")
                    files_btn = gr.Button("\U0001f504 files", elem_id="lora_workshop_tools_files")
                for t in names:
                    with gr.Column(visible=t == names[0]) as group:
                        gr.Markdown(TOOLS[t].description)
                        options = TOOLS[t].on("tab")
                        for i in range(0, len(options), 3):
                            with gr.Row():
                                for o in options[i:i + 3]:
                                    make(t, o)
                    groups.append(group)
            with gr.Column(scale=2):
                run_btn = gr.Button("Run", variant="primary", elem_id="lora_workshop_tools_run")
                message = gr.HTML(elem_id="lora_workshop_tools_message")
                status = gr.HTML(status_html(None), elem_id="lora_workshop_tools_status")
                log = gr.Textbox(label="Result", lines=6, max_lines=12, interactive=False,
                                 elem_id="lora_workshop_tools_log")
                poll_btn = gr.Button("Refresh", elem_id=POLL_ID)

        components = [c for _, _, c in inputs]
        unsaved([selector, *components])

        def on_tool(name: str):
            return [gr.update(visible=name == t) for t in names]

        def on_run(name: str, *values):
            mine = {key: v for (t, key, _), v in zip(inputs, values) if t == name}
            return run_from_form(runner, name, mine)

        def on_files():
            now = lists()
            return [gr.update(choices=([NONE] if optional else []) + now[kind]) for kind, _, optional in pickers]

        selector.change(fn=on_tool, inputs=[selector], outputs=groups)
        run_btn.click(fn=on_run, inputs=[selector] + components, outputs=[message])
        files_btn.click(fn=on_files, inputs=[], outputs=[c for _, c, _ in pickers])
        poll_btn.click(fn=lambda: poll(runner), inputs=[], outputs=[status, log], show_progress="hidden",
                       queue=False)
