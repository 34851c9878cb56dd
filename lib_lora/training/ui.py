"""The "LoRA Workshop" training tab, for the gradio the WebUI ships (3.41.x).

``create_tab(runner)`` is the only function that imports gradio; everything it shows is made
by plain functions (form <-> request here; status HTML and the loss plot in ui_views.py),
which work and are tested without gradio.  The tab never holds the WebUI's queue lock itself:
Start hands the request to the ``JobRunner``, whose thread takes the lock, so the page stays
responsive.  javascript/lora_workshop.js clicks the tab's Refresh button every 2 s while the tab
is visible.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from . import kohya_config, kohya_dataset, options, toml_io
from .buckets import parse_resolution
from .errors import JobError
from .jobs import JobRunner
from .options import AUTO_ON_OFF
from .problems import DatasetError
from .presets import PRESET_LABELS, PRESETS, preset_for_family
from .state import list_state_files
from .ui_views import loss_plot, message_html, status_html, summary_html

TAB_TITLE = "LoRA Workshop"
TAB_ID = "lora_workshop"          # the WebUI wraps it as #tab_lora_workshop
POLL_ID = "lora_workshop_poll"    # the Refresh button the script clicks
KEEP_TIMEOUT = 120.0              # seconds "Keep this state" waits for the next step boundary

# (request key, label, kind, extra) per tab section, from the option schema (options.py); kinds: text,
# textarea, int, float, opt_int/opt_float (0 = not set), bool, choice, auto_bool (auto/on/off =
# None/True/False).  Keys with a dot go into the "dataset"/"network" objects of the request.
_PLACEHOLDERS = {"dataset.train_dir": "holds '<repeats>_<trigger>' sub-folders, e.g. 10_mychar"}


def _field(o: options.Option) -> tuple[str, str, str, dict]:
    extra: dict[str, Any] = {}
    if o.form_kind == "choice":
        extra["choices"] = list(o.form_choices if o.form_choices is not None else o.choices)
    if o.key in _PLACEHOLDERS:
        extra["placeholder"] = _PLACEHOLDERS[o.key]
    return (o.key, o.label, o.form_kind, extra)


SECTIONS: list[tuple[str, bool, list[tuple[str, str, str, dict]]]] = [
    (title, is_open, [_field(o) for o in options.OPTIONS if o.label and o.group == title])
    for title, is_open in options.GROUPS]
FIELDS = [f for _, _, fields in SECTIONS for f in fields]
KEYS = ["output_name"] + [f[0] for f in FIELDS]
_KINDS = {"output_name": "text", **{f[0]: f[2] for f in FIELDS}}


def _default(key: str) -> Any:
    value = options.default(key)
    return None if value is options.REQUIRED else value


def preset_values(preset: str, family: str | None = None) -> dict[str, Any]:
    """Form values (by request key) for a preset: the preset's values over the dataclass defaults; kohya's
    ``v2`` ticked when the host's loaded model (``family``) is SD2, as sd-scripts would need it."""
    data = PRESETS[preset]
    out: dict[str, Any] = {}
    for key in KEYS[1:]:
        section, _, name = key.rpartition(".")
        src = data.get(section, {}) if section else data
        value = src[name] if name in src else _default(key)
        out[key] = to_form(key, value)
    out["v2"] = family == "sd2"
    return out


def to_form(key: str, value: Any) -> Any:
    kind = _KINDS[key]
    if kind in ("opt_int", "opt_float"):
        return 0 if value is None else value
    if kind == "textarea":
        return "\n".join(value) if isinstance(value, (list, tuple)) else (value or "")
    if kind == "text":
        return "" if value is None else str(value)
    if kind == "auto_bool":
        return next(k for k, v in AUTO_ON_OFF.items() if v is value)
    return value


def form_to_request(values: dict[str, Any], preset: str | None = None, config_toml: str = "",
                    dataset_toml: str = "", family: str | None = None) -> dict[str, Any]:
    """Form values (by request key) -> a request for ``JobRunner.start`` / the HTTP API.

    kohya's files travel with it: the form's values win over ``config_toml``'s (which gives what
    the form has no field for), and ``dataset_toml`` names the images instead of the form's folders.
    ``family``: the host's loaded model, which decides kohya's ``v2`` (the form's tick is set when the tab
    is built or a preset chosen, so a checkpoint switch since leaves it stale either way)."""
    req: dict[str, Any] = {"dataset": {}, "network": {}}
    if preset:
        req["preset"] = preset
    if (config_toml or "").strip():
        req["config_toml"] = config_toml
    if (dataset_toml or "").strip():
        req["dataset_toml"] = dataset_toml
    for key, value in values.items():
        kind = _KINDS.get(key)
        if kind is None:
            continue
        if kind in ("opt_int", "opt_float"):
            value = None if value in (None, "", 0, 0.0) else value
        elif kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind == "text":
            value = (value or "").strip()
            if key == "dataset.reg_dir" and not value:
                value = None
        elif kind == "textarea":
            value = [line.strip() for line in (value or "").splitlines() if line.strip()]
        elif kind == "auto_bool":
            value = AUTO_ON_OFF[value or "auto"]
        section, _, name = key.rpartition(".")
        (req[section] if section else req)[name] = value
    if family is not None:
        req["v2"] = family == "sd2"
    return req


# -- kohya's files ---------------------------------------------------------------------------------


def _form_values(data: dict, keys: list[str], notes: list[str], source: str) -> dict[str, Any]:
    out = {}
    for key in keys:
        section, _, name = key.rpartition(".")
        src = data.get(section, {}) if section else data
        value = src[name] if name in src else _default(key)
        if key == "dataset.resolution" and not isinstance(value, int):
            try:
                w, h = parse_resolution(value)
            except ValueError:
                raise JobError(f"{source}: resolution {value!r} is not a size") from None
            if w != h:
                notes.append(f"{source}: resolution {w},{h} is not square and the form takes one size: "
                             "set it in a dataset.toml's [general] instead")
                continue
            value = w
        out[key] = to_form(key, value)
    return out


def import_files(config_text: str, dataset_text: str) -> tuple[dict[str, Any], list[str]]:
    """The form's values from kohya's files (what a file leaves out takes its default, as kohya
    reads it), and notes on what the form does not show.  A dataset.toml clears the form's
    folders: it names the images itself."""
    notes: list[str] = []
    values: dict[str, Any] = {}
    if (config_text or "").strip():
        data, extras = kohya_config.read_config(toml_io.loads(config_text, "config.toml"), "config.toml")
        notes.extend(kohya_config.noted(extras, "config.toml"))
        values.update(_form_values(data, KEYS, notes, "config.toml"))
        for key in ("pretrained_model_name_or_path", "resume", "device", "dataset_config"):
            if key in extras:
                notes.append(f"config.toml: {key} is not used by the tab (it trains the loaded model; paste the "
                             "dataset config into the dataset.toml box)")
        hidden = [o.kohya or o.name for o in options.OPTIONS
                  if not o.label and o.key not in ("output_name", "output_dir") and (data.get(o.section, {}) if o.section else data).get(o.name, o.default) != o.default]
        if hidden:
            notes.append(f"config.toml: {', '.join(hidden)} apply from the file (the form has no field for them)")
    if (dataset_text or "").strip():
        general, top = kohya_dataset.read_dataset_config(toml_io.loads(dataset_text, "dataset.toml"),
                                                         "dataset.toml")
        keys = [k for k in KEYS if k.startswith("dataset.") and k[len("dataset."):] in general or k in top]
        values.update(_form_values({"dataset": general, **top}, keys, notes, "dataset.toml"))
        values["dataset.train_dir"] = values["dataset.reg_dir"] = ""
        n = sum(len(d["subsets"]) for d in general["datasets"])
        notes.append(f"dataset.toml: {len(general['datasets'])} dataset(s) of {n} image folder(s) replace the "
                     "dataset folder; its settings win over the form's")
    return values, notes


# -- views -----------------------------------------------------------------------------------------


def preset_key(label: str | None) -> str:
    for key, text in PRESET_LABELS.items():
        if label in (key, text):
            return key
    return "sd15"


# -- the tab -------------------------------------------------------------------------------------------


def create_tab(runner: JobRunner, sections: Sequence[Callable[[], None]] = ()) -> list:
    """Build the tab (gradio 3.41 API); returns what script_callbacks.on_ui_tabs expects.

    ``sections`` build further parts of the tab below the training form (the tools).
    """
    import gradio as gr

    host = runner.host
    default_preset = preset_for_family(host.family())
    start_values = preset_values(default_preset, host.family())
    components: dict[str, Any] = {}

    def make(key: str, label: str, kind: str, extra: dict):
        value = start_values.get(key, "")
        eid = "lora_workshop_" + key.replace(".", "_")
        if kind == "bool":
            return gr.Checkbox(label=label, value=bool(value), elem_id=eid)
        if kind == "choice":
            return gr.Dropdown(label=label, choices=extra["choices"], value=value, elem_id=eid)
        if kind == "auto_bool":
            return gr.Radio(label=label, choices=list(AUTO_ON_OFF), value=value, elem_id=eid)
        if kind in ("int", "opt_int"):
            return gr.Number(label=label, value=value, precision=0, elem_id=eid)
        if kind in ("float", "opt_float"):
            return gr.Number(label=label, value=value, elem_id=eid)
        if kind == "textarea":
            return gr.Textbox(label=label, value=value, lines=3, elem_id=eid)
        return gr.Textbox(label=label, value=value, placeholder=extra.get("placeholder"), elem_id=eid)

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=list(PRESET_LABELS.values()),
                                         value=PRESET_LABELS[default_preset], elem_id="lora_workshop_preset")
                    components["output_name"] = gr.Textbox(label="Output name (file in the LoRA folder)",
                                                           placeholder="my_lora", elem_id="lora_workshop_output_name")
                for title, is_open, fields in SECTIONS:
                    with gr.Accordion(title, open=is_open):
                        per_row = 2 if title == "Dataset" else 3
                        for i in range(0, len(fields), per_row):
                            with gr.Row():
                                for key, label, kind, extra in fields[i:i + per_row]:
                                    components[key] = make(key, label, kind, extra)
                with gr.Accordion("kohya's config.toml and dataset.toml", open=False):
                    toml_file = gr.File(label="Open a .toml file (config or dataset)", file_types=[".toml"],
                                        type="binary", elem_id="lora_workshop_toml_file")
                    with gr.Row():
                        config_box = gr.Textbox(label="config.toml (sent with Start: the form wins over it)", lines=8,
                                                elem_id="lora_workshop_config_toml")
                        dataset_box = gr.Textbox(label="dataset.toml (sent with Start: it names the images)",
                                                 lines=8, elem_id="lora_workshop_dataset_toml")
                    with gr.Row():
                        import_btn = gr.Button("Fill the form from these files", elem_id="lora_workshop_import")
                        export_btn = gr.Button("Write the form as these files", elem_id="lora_workshop_export")
                    files_message = gr.HTML(elem_id="lora_workshop_files_message")
            with gr.Column(scale=2):
                with gr.Row():
                    validate_btn = gr.Button("Validate", elem_id="lora_workshop_validate")
                    start_btn = gr.Button("Start", variant="primary", elem_id="lora_workshop_start")
                    stop_btn = gr.Button("Stop", elem_id="lora_workshop_stop")
                    save_btn = gr.Button("Stop & save", variant="stop", elem_id="lora_workshop_stop_save")
                    keep_btn = gr.Button("Keep this state", elem_id="lora_workshop_keep")
                with gr.Row():
                    resume_from = gr.Dropdown(label="Resume from state", choices=list_state_files(host.output_dir()),
                                              elem_id="lora_workshop_resume_from")
                    states_btn = gr.Button("\U0001f504", elem_id="lora_workshop_states_refresh")
                    resume_btn = gr.Button("Resume", elem_id="lora_workshop_resume")
                message = gr.HTML(elem_id="lora_workshop_message")
                status = gr.HTML(status_html(None), elem_id="lora_workshop_status")
                plot = gr.Image(label="Loss", type="pil", interactive=False, elem_id="lora_workshop_loss")
                gallery = gr.Gallery(label="Sample images", columns=4, elem_id="lora_workshop_samples")
                log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="lora_workshop_log")
                refresh_btn = gr.Button("Refresh", elem_id=POLL_ID)
                validation = gr.HTML(elem_id="lora_workshop_validation")
        for section in sections:
            section()
        seen = gr.State(None)

        keys = list(components)
        inputs = [config_box, dataset_box] + [components[k] for k in keys]

        def request(preset_label, config_text, dataset_text, *values):
            return form_to_request(dict(zip(keys, values)), preset_key(preset_label), config_text, dataset_text,
                                   family=host.family())

        def on_upload(data):
            text = data.decode("utf-8-sig") if isinstance(data, bytes) else ""
            try:  # a dataset config is the one with [[datasets]]
                is_dataset = "datasets" in toml_io.loads(text, "the file")
            except JobError as e:
                return gr.update(), gr.update(), message_html(str(e), error=True)
            if is_dataset:
                return gr.update(), text, message_html("Dataset config loaded: fill the form from it, or Start.")
            return text, gr.update(), message_html("Config loaded: fill the form from it.")

        def on_import(config_text, dataset_text):
            try:
                values, notes = import_files(config_text, dataset_text)
            except JobError as e:
                return [message_html(str(e), error=True)] + [gr.update() for _ in keys]
            text = "; ".join(notes) or "The form now holds the files' settings."
            return [message_html(text)] + [gr.update(value=values[k]) if k in values else gr.update() for k in keys]

        def on_export(preset_label, config_text, dataset_text, *values):
            try:
                req = runner.request(request(preset_label, config_text, dataset_text, *values))
                files = kohya_config.export_files(req.config)
            except (JobError, DatasetError, ValueError) as e:
                return gr.update(), gr.update(), message_html(str(e), error=True)
            return files["config_toml"], files["dataset_toml"], message_html(
                "; ".join(req.notes) or "Written: save each box as a .toml file for kohya's scripts.")

        def on_preset(label):
            vals = preset_values(preset_key(label), host.family())
            return [gr.update(value=vals[k]) if k in vals else gr.update() for k in keys]

        def on_validate(preset_label, *values):
            try:
                summary, problems = runner.validate(request(preset_label, *values))
            except (JobError, DatasetError, ValueError) as e:
                return message_html(str(e), error=True)
            return summary_html(summary, problems)

        def on_start(preset_label, *values):
            try:
                job = runner.start(request(preset_label, *values))
            except (JobError, DatasetError, ValueError) as e:
                return message_html(str(e), error=True)
            return message_html(f"Started {job.name}: {job.total} steps.")

        def on_stop(save: bool):
            job = runner.active()
            if job is None:
                return message_html("No training job is running.", error=True)
            job.request_stop(save=save)
            return message_html(f"Stopping {job.name}{' after saving' if save else ''}...")

        def on_keep():
            job = runner.active()
            if job is None:
                return message_html("No training job is running.", error=True)
            try:
                request = job.request_keep()
                path = request.wait(KEEP_TIMEOUT)
            except JobError as e:
                return message_html(str(e), error=True)
            except TimeoutError:
                return message_html(f"{job.name} has not reached its next step yet; the state will be kept there.")
            return message_html(f"Kept step {request.step} as {path.name}; training goes on.")

        def on_resume(name):
            if not name:
                return message_html("Choose a state file first.", error=True)
            try:
                job = runner.start({"resume_from": name})
            except (JobError, DatasetError, ValueError) as e:
                return message_html(str(e), error=True)
            return message_html(f"Resuming {job.name} from {name}.")

        def on_poll(last):
            job = runner.active() or runner.latest()
            st = job.status(relative_to=host.output_dir()) if job else None
            describe = getattr(host, "describe", None)
            head = status_html(st, describe() if callable(describe) else "")
            if st is None:
                return head, gr.update(), gr.update(), "", None
            key = (st["id"], st["step"], len(st["samples"]), st["state"])
            if key == last:
                return head, gr.update(), gr.update(), "\n".join(st["log"]), last
            paths = [str(p) for p in job.sample_paths()]
            return head, loss_plot(st["loss_history"]), paths, "\n".join(st["log"]), key

        preset.change(fn=on_preset, inputs=[preset], outputs=inputs[2:])
        toml_file.upload(fn=on_upload, inputs=[toml_file], outputs=[config_box, dataset_box, files_message])
        import_btn.click(fn=on_import, inputs=[config_box, dataset_box], outputs=[files_message] + inputs[2:])
        export_btn.click(fn=on_export, inputs=[preset] + inputs, outputs=[config_box, dataset_box, files_message])
        validate_btn.click(fn=on_validate, inputs=[preset] + inputs, outputs=[validation])
        start_btn.click(fn=on_start, inputs=[preset] + inputs, outputs=[message])
        stop_btn.click(fn=lambda: on_stop(False), inputs=[], outputs=[message])
        save_btn.click(fn=lambda: on_stop(True), inputs=[], outputs=[message])
        keep_btn.click(fn=on_keep, inputs=[], outputs=[message])
        states_btn.click(fn=lambda: gr.update(choices=list_state_files(host.output_dir())), inputs=[],
                         outputs=[resume_from])
        resume_btn.click(fn=on_resume, inputs=[resume_from], outputs=[message])
        refresh_btn.click(fn=on_poll, inputs=[seen], outputs=[status, plot, gallery, log, seen],
                          show_progress="hidden", queue=False)

    return [(tab, TAB_TITLE, TAB_ID)]
