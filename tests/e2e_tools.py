"""The tools (resize, merge, bake, extract, convert) in the real WebUI: the tab's Tools section as gradio 3.41.2
builds it, jobs through the API and through the Run button's own event handler, and their outputs used by
the WebUI.  Collected by tests/test_e2e_webui.py, whose ``server`` fixture they use.

References: a resized file has the rank asked for; a baked weight is the checkpoint's plus the LoRA's
``up @ down * alpha / rank`` computed here from the two files; the defaults shown are the declarations'.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from webui_server import LORA_NAME, GradioUI, Server, pixels, webui_python

API = "/lora-workshop/v1"
ROOT = Path(__file__).resolve().parent.parent


def wait(server: Server, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while True:
        status, st = server.request("GET", f"{API}/tools/jobs/{job_id}")
        assert status == 200, st
        if st["state"] not in ("queued", "running"):
            return st
        assert time.time() < deadline, f"tool job {job_id} did not end: {st}\n{server.log_tail()}"
        time.sleep(0.5)


def run(server: Server, tool: str, body: dict) -> dict:
    status, job = server.request("POST", f"{API}/tools/{tool}", body)
    assert status == 200, job
    st = wait(server, job["id"])
    assert st["state"] == "finished", f"{st}\n{server.log_tail()}"
    return st


def layers_from(server: Server) -> dict:
    """The tiny checkpoint as the layer shapes a LoRA is checked against (the family's are full-size)."""
    return {} if os.environ.get("WEBUI_E2E_CKPT") else {"base": server.ckpt.name}


def entries(choices: list) -> list:
    """A Dropdown's or Radio's choices as the config gives them: values, or [label, value] pairs."""
    return [c[1] if isinstance(c, list) else c for c in choices]


def ranks(path: Path) -> set[int]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}


def test_gradio_standin_takes_what_the_webuis_gradio_takes():
    """tests/gradio_standin.py's keyword lists, first positional arguments and listener keywords are gradio
    3.41.2's: each keyword it allows is used by the WebUI's gradio (no "unused kwarg" warning)."""
    import gradio_standin

    code = r"""
import inspect, json, sys, warnings
import gradio as gr
from gradio.deprecation import GradioUnusedKwargWarning
spec = json.loads(sys.argv[1])
out = {"version": gr.__version__, "unused": {}, "positional": {}}
for name, keywords in spec.items():
    cls = getattr(gr, name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    out["positional"][name] = next((p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD), None)
    defaults = {}
    for c in cls.__mro__:  # a keyword may reach a base class through **kwargs: its default from there
        for p in inspect.signature(c.__init__).parameters.values() if "__init__" in vars(c) else ():
            if p.default is not p.empty:
                defaults.setdefault(p.name, p.default)
    for k in keywords:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with gr.Blocks():
                cls(**{**({"label": "x"} if name == "Accordion" else {}), k: defaults.get(k)})
        if any(issubclass(x.category, GradioUnusedKwargWarning) for x in w):
            out["unused"].setdefault(name, []).append(k)
with gr.Blocks():
    click = gr.Button().click
out["listener"] = sorted(p for p in inspect.signature(click).parameters if p not in ("fn", "inputs", "outputs"))
print(json.dumps(out))
"""
    webui = os.environ["WEBUI_DIR"]
    spec = {k: sorted(v) for k, v in gradio_standin.SIGNATURES.items()}
    r = subprocess.run([webui_python(Path(webui)), "-c", code, json.dumps(spec)], cwd=webui,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    real = json.loads(r.stdout.strip().splitlines()[-1])
    assert real["version"] == "3.41.2"
    assert real["unused"] == {}, real["unused"]
    assert {k: gradio_standin.POSITIONAL.get(k, "value") for k in gradio_standin.SIGNATURES} == real["positional"]
    assert sorted(gradio_standin.LISTENER) == real["listener"]


def test_tools_section_is_built_by_the_webuis_gradio(server):
    """The page's config holds every tab option of every tool, once, at its declared default (the WebUI's saved
    UI defaults included), inside the LoRA Workshop tab; building it logged no warning or error."""
    from lib_lora.tools import ui as tools_ui
    from lib_lora.tools.options import TOOLS

    ui = GradioUI(server)
    comps = ui.by_id

    def path_to(node: dict, cid: int) -> list[int] | None:
        if node["id"] == cid:
            return [cid]
        for c in node.get("children", []):
            if (p := path_to(c, cid)) is not None:
                return [node["id"], *p]
        return None

    section = ui.elem("lora_workshop_tools")
    above = [comps[i]["props"].get("elem_id") for i in path_to(ui.config["layout"], section)[1:] if i in comps]
    assert "tab_lora_workshop" in above, above
    selector = comps[ui.elem("lora_workshop_tools_tool")]["props"]
    assert entries(selector["choices"]) == list(TOOLS)
    assert selector["value"] == "resize"
    for t in TOOLS.values():
        for o in t.on("tab"):
            props = comps[ui.elem(f"lora_workshop_tools_{t.name}_{o.name}")]["props"]
            kind = tools_ui.widget(o)
            want = tools_ui.start_value(o)
            want = [] if kind == "loras" else ("" if want is None else want) if kind == "text" else want
            assert props.get("value") == want, (t.name, o.name, props)
            if kind == "choice":
                assert entries(props["choices"]) == tools_ui.choices(o), (t.name, o.name)
    lora_picker = comps[ui.elem("lora_workshop_tools_resize_file")]["props"]
    assert LORA_NAME in entries(lora_picker["choices"])
    ckpt_picker = comps[ui.elem("lora_workshop_tools_bake_base")]["props"]
    assert any(c.startswith("tiny.safetensors") for c in entries(ckpt_picker["choices"])), ckpt_picker

    # gradio names the caller's file in its warnings ("unused kwarg" for a keyword it ignores)
    log = server.log.read_text(errors="replace")
    assert not [ln for ln in log.splitlines() if "lib_lora" in ln and "Warning" in ln], server.log_tail()
    for tb in log.split("Traceback")[1:]:
        assert "lib_lora" not in tb[:4000], "Traceback" + tb[:4000]


def test_resize_job_output_is_a_lora_the_webui_applies(server):
    """A resize through the API (auth as for the WebUI's API) to a new name: listed at once, applied by <lora:>."""
    from lib_lora.hashes import addnet_hash_safetensors

    body = {"file": LORA_NAME, "out": "e2e_resized", "rank": 2, "dtype": "fp32", **layers_from(server)}
    assert server.request("POST", f"{API}/tools/resize", body, auth=None)[0] == 401
    assert server.request("GET", f"{API}/tools/jobs", auth=None)[0] == 401
    status, described = server.request("GET", f"{API}/tools")
    assert status == 200 and list(described) == ["resize", "merge", "bake", "extract", "convert"]
    st = run(server, "resize", body)
    assert st["output"] == "e2e_resized.safetensors" and st["done"] == st["total"] > 0, st
    out = server.lora.parent / "e2e_resized.safetensors"
    assert ranks(out) == {2}

    listed = {x["name"]: x["path"] for x in server.request("GET", f"{API}/loras")[1]}
    assert listed.get("e2e_resized") == "e2e_resized.safetensors"   # no refresh, no restart
    plain = server.txt2img("a photo")
    original = server.txt2img(f"a photo <lora:{LORA_NAME}:1>")
    resized = server.txt2img("a photo <lora:e2e_resized:1>")
    assert resized["info"]["extra_generation_params"].get("Lora hashes") == \
        f"e2e_resized: {addnet_hash_safetensors(out)[:12]}", resized["info"]
    assert pixels(resized["image"]) not in (pixels(plain["image"]), pixels(original["image"]))
    assert server.txt2img("a photo")["image"] == plain["image"]


def test_bake_writes_a_checkpoint_the_webui_lists(server):
    """A bake of the loaded checkpoint with the LoRA: in the checkpoint folder, in /sdapi/v1/sd-models without
    a refresh call, each touched weight the checkpoint's plus the LoRA's product."""
    import pytest
    import torch
    from safetensors.torch import load_file

    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("the weights are checked for the tiny checkpoint and its LoRA")
    st = run(server, "bake", {"base": "tiny.safetensors", "loras": [f"{LORA_NAME}:0.5"], "out": "e2e_baked"})
    assert st["output"] == "e2e_baked.safetensors", st
    baked_path = server.ckpt.parent / "e2e_baked.safetensors"
    status, models = server.request("GET", "/sdapi/v1/sd-models")
    assert status == 200
    assert [m["model_name"] for m in models if Path(m["filename"]) == baked_path] == ["e2e_baked"], models

    base, baked, lora = load_file(server.ckpt), load_file(baked_path), load_file(server.lora)
    assert {k: (v.dtype, v.shape) for k, v in baked.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    changed = sorted(k for k in base if not torch.equal(base[k], baked[k]))
    modules = {k.split(".")[0] for k in lora}
    assert len(changed) == len(modules), (len(changed), len(modules))
    prefix = "lora_te_text_model_encoder_layers_"
    for i in (0, 11):
        key = f"{prefix}{i}_self_attn_q_proj"
        down, up = lora[f"{key}.lora_down.weight"].double(), lora[f"{key}.lora_up.weight"].double()
        ck = f"cond_stage_model.transformer.text_model.encoder.layers.{i}.self_attn.q_proj.weight"
        want = base[ck].double() + 0.5 * up @ down * float(lora[f"{key}.alpha"]) / down.shape[0]
        assert baked[ck].dtype == torch.float16
        # the checkpoint's fp16: the sum rounded once, up to one step of fp16 (2**-10 relative)
        torch.testing.assert_close(baked[ck].double(), want, rtol=2 ** -10, atol=1e-7)


def test_tool_refusals_over_http(server):
    """Outputs outside the folder, existing outputs without force and unknown names are refused at once."""
    r = server.request("POST", f"{API}/tools/resize", {"file": LORA_NAME, "out": "../x", **layers_from(server)})
    assert r[0] == 400 and r[1]["detail"].startswith("OptionError: out:"), r
    assert not (server.lora.parent.parent / "x.safetensors").exists()
    assert run(server, "convert", {"file": LORA_NAME, "out": "e2e_converted"})["output"] == "e2e_converted.safetensors"
    written = (server.lora.parent / "e2e_converted.safetensors").stat().st_mtime_ns
    r = server.request("POST", f"{API}/tools/convert", {"file": LORA_NAME, "out": "e2e_converted"})
    assert r[0] == 409 and r[1]["detail"].startswith("FileExistsError: e2e_converted.safetensors exists"), r
    r = server.request("POST", f"{API}/tools/bake", {"base": "tiny.safetensors", "loras": [LORA_NAME], "out": "tiny"})
    assert r[0] == 409 and "overwrite an input" in r[1]["detail"], r
    r = server.request("POST", f"{API}/tools/resize", {"file": "no_such_lora", "out": "y"})
    assert r[0] == 404 and "LoraNotFound" in r[1]["detail"], r
    assert (server.lora.parent / "e2e_converted.safetensors").stat().st_mtime_ns == written
    assert run(server, "convert", {"file": LORA_NAME, "out": "e2e_converted", "force": True})["state"] == "finished"


def test_run_button_starts_a_job_through_gradio(server):
    """The Tools section's own handlers, called as the browser calls them: pick a tool, Run, poll, refresh pickers."""
    from lib_lora.tools import ui as tools_ui
    from lib_lora.tools.options import TOOLS

    ui = GradioUI(server)
    change = ui.fn_index("change", target="lora_workshop_tools_tool")
    shown = ui.call(change, "convert")
    assert [u.get("visible") for u in shown] == [t == "convert" for t in TOOLS], shown

    run_fn = ui.fn_index("click", target="lora_workshop_tools_run")
    inputs = ui.config["dependencies"][run_fn]["inputs"]
    values = {ui.by_id[i]["props"]["elem_id"]: ui.by_id[i]["props"].get("value") for i in inputs}
    values.update({"lora_workshop_tools_tool": "resize", "lora_workshop_tools_resize_file": LORA_NAME,
                   "lora_workshop_tools_resize_out": "e2e_from_tab", "lora_workshop_tools_resize_rank": 3})
    if layers_from(server):  # the checkpoint as the picker lists it: the WebUI's title, "tiny.safetensors [hash]"
        base = ui.by_id[ui.elem("lora_workshop_tools_resize_base")]["props"]
        [values["lora_workshop_tools_resize_base"]] = [
            c for c in entries(base["choices"]) if c.startswith(server.ckpt.name + " [")]
    [message] = ui.call(run_fn, *[values[ui.by_id[i]["props"]["elem_id"]] for i in inputs])
    assert "Queued resize -&gt; e2e_from_tab.safetensors" in message, message
    job_id = message.rsplit("(job ", 1)[1].split(")")[0]
    st = wait(server, job_id)
    assert st["state"] == "finished", st
    assert ranks(server.lora.parent / "e2e_from_tab.safetensors") == {3}

    poll = ui.fn_index("click", target=tools_ui.POLL_ID)
    status_html, log = ui.call(poll)
    assert "e2e_from_tab.safetensors" in status_html and "finished" in status_html, status_html
    assert "energy kept overall" in log, log
    files = ui.fn_index("click", target="lora_workshop_tools_files")
    pickers = ui.outputs(files, ui.call(files))
    resize_file = pickers[ui.elem("lora_workshop_tools_resize_file")]
    assert "e2e_from_tab" in entries(resize_file["choices"]), resize_file
    [again] = ui.call(run_fn, *[values[ui.by_id[i]["props"]["elem_id"]] for i in inputs])
    assert "lw-error" in again and "exists" in again, again
