"""The tools as jobs inside the stand-in WebUI: the API (behind --api-auth), the tab's Tools section, path
confinement, overwrite refusal, named errors, the queue lock, the progress bar and the refreshed lists.

A tiny real SD1 checkpoint sits in models/Stable-diffusion (listed by the stand-in ``sd_models``)
and tiny LoRAs for it in models/Lora; jobs run in the runner's worker thread exactly as in the WebUI.
References: the best rank-r approximation by ``torch.linalg.svd`` (Eckart–Young) and weights
computed by hand from the LoRA's factors.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import call_queue, script_callbacks, sd_models, shared  # noqa: E402

import gradio_standin  # noqa: E402
import tiny_models as tm  # noqa: E402
from lib_lora.fileio import TensorFile, load_file, save_safetensors  # noqa: E402
from lib_lora.hosts import webui as host  # noqa: E402
from lib_lora.hosts import webui_tools as wtools  # noqa: E402
from lib_lora.hosts.cli.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from lib_lora.modelmap import ModelMap  # noqa: E402
from lib_lora.tools import ui as tools_ui  # noqa: E402
from lib_lora.tools.jobs import ToolRunner  # noqa: E402
from lib_lora.tools.options import TOOLS, OptionError, coerce  # noqa: E402
from loras import kohya_lora  # noqa: E402
from train_support import tiny_vae  # noqa: E402

pytest.importorskip("fastapi")

TIMEOUT = 60
AUTH = ("alice", "s3cret")
API = "/lora-workshop/v1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 checkpoint (fp32), two LoRAs for it and one for SDXL."""
    root = tmp_path_factory.mktemp("tool-files")
    tiny = tm.build_sd1(seed=1)
    ck = save_checkpoint(Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae()),
                         root / "tiny.safetensors", dtype=torch.float32, yaml=False)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    a = save_safetensors(kohya_lora(mm, rank=4, alpha=2.0, seed=2, only=("attn2_to_k", "self_attn_q")),
                         root / "a.safetensors", {"ss_base_model_version": "sd_v1"})
    b = save_safetensors(kohya_lora(mm, rank=2, seed=3, only=("attn1_to_v",)), root / "b.safetensors",
                         {"ss_base_model_version": "sd_v1"})
    xl = tm.build_sdxl()
    x = save_safetensors(kohya_lora(ModelMap.build("sdxl", xl.unet, xl.text_encoders), rank=2, only=("attn1_to_q",)),
                         root / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    return {"ckpt": ck, "a": a, "b": b, "xl": x}


class WebUI:
    """The stand-in WebUI (conftest's) with the tiny checkpoint and LoRAs in its folders, the gradio stand-in,
    --api-auth, and the extension loaded."""

    def __init__(self, base, files: dict):
        self.lora_dir, self.ckpt_dir = base.lora_dir, base.ckpt_dir
        shutil.copy(files["ckpt"], self.ckpt_dir / "tiny.safetensors")
        for name in ("a", "b", "xl"):
            shutil.copy(files[name], self.lora_dir / f"{name}.safetensors")
        base.mp.setitem(sys.modules, "gradio", gradio_standin)
        self.client = base.start(auth=f"{AUTH[0]}:{AUTH[1]}")

    @property
    def runner(self) -> ToolRunner:
        return wtools.get_runner()

    def post(self, tool: str, body: dict, auth=AUTH):
        return self.client.post(f"{API}/tools/{tool}", json=body, auth=auth)

    def run(self, tool: str, body: dict) -> dict:
        r = self.post(tool, body)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "queued"
        return self.wait(r.json()["id"])

    def wait(self, job_id: str) -> dict:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            st = self.client.get(f"{API}/tools/jobs/{job_id}", auth=AUTH).json()
            if st["state"] not in ("queued", "running"):
                return st
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not end: {st}")

    def close(self) -> None:
        runner = wtools._runners.current
        if runner is not None:
            for job in runner.jobs():
                job.request_stop()
                job.wait(TIMEOUT)


@pytest.fixture
def webui(standin_webui, files):
    w = WebUI(standin_webui, files)
    yield w
    w.close()


def kohya_delta(sd: dict, key: str) -> torch.Tensor:
    down, up = sd[f"{key}.lora_down.weight"].double(), sd[f"{key}.lora_up.weight"].double()
    alpha = sd.get(f"{key}.alpha")
    return up.flatten(1) @ down.flatten(1) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)


def module_keys(sd: dict) -> list[str]:
    return sorted({k.split(".")[0] for k in sd})


# -- the API -----------------------------------------------------------------------------------------------


def test_resize_job_over_the_api_with_auth_runs_to_the_best_rank_r_and_refreshes_the_library(webui, files):
    assert webui.post("resize", {"file": "a", "out": "a-r2"}, auth=None).status_code == 401
    assert webui.client.get(f"{API}/tools/jobs").status_code == 401
    assert webui.post("resize", {"file": "a", "out": "a-r2"}, auth=("alice", "wrong")).status_code == 401
    st = webui.run("resize", {"file": "a", "out": "a-r2", "rank": 2, "base": "tiny.safetensors", "dtype": "fp32"})

    assert st["state"] == "finished" and st["error"] is None, st
    assert st["output"] == "a-r2.safetensors" and st["tool"] == "resize"
    assert st["done"] == st["total"] > 0 and st["progress"] == 1.0 and st["eta"] is None
    assert any("energy kept overall" in line for line in st["log"])
    assert not any(str(webui.lora_dir) in line for line in st["log"])  # no absolute paths in answers
    src, out = load_file(files["a"])[0], load_file(webui.lora_dir / "a-r2.safetensors")[0]
    assert module_keys(out) == module_keys(src)
    for k in module_keys(src):  # Eckart–Young: the best rank-2 approximation of the exact delta
        u, s, vh = torch.linalg.svd(kohya_delta(src, k), full_matrices=False)
        torch.testing.assert_close(kohya_delta(out, k), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4, msg=k)

    # the library was refreshed: the new file is a card and in the API without a restart
    names = [e["name"] for e in webui.client.get(f"{API}/loras", auth=AUTH).json()]
    assert "a-r2" in names
    assert "a-r2" in [i["name"] for i in host.get_workshop().page.list_items()]
    listed = webui.client.get(f"{API}/tools/jobs", auth=AUTH).json()["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(st["id"], "finished")]
    # queue lock released, progress bar ended
    assert call_queue.queue_lock.acquire(blocking=False)
    call_queue.queue_lock.release()
    assert shared.state.job == "" and "resize a-r2.safetensors" in shared.state.textinfo


def test_described_options_are_the_declarations(webui):
    d = webui.client.get(f"{API}/tools", auth=AUTH).json()
    assert list(d) == ["resize", "merge", "bake", "extract", "convert"]
    resize = {o["name"]: o for o in d["resize"]["options"]}
    assert resize["rank"]["default"] == 32 and resize["file"]["kind"] == "lora" and resize["file"]["required"]
    assert resize["dynamic_method"]["choices"] == ["sv_ratio", "sv_fro", "sv_cumulative"]
    assert "device" not in resize and "quiet" not in resize   # command-line only
    assert {o["name"]: o["kind"] for o in d["bake"]["options"] if o["kind"]} == \
        {"base": "checkpoint", "loras": "loras", "out": "checkpoint_output"}


def test_output_names_and_inputs_are_confined_to_the_model_folders(webui, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = shutil.copy(webui.lora_dir / "a.safetensors", outside / "secret.safetensors")
    for bad in ("../x", "/tmp/x", "sub/x", "..", ".hidden", "x\\y", "C:x", "con"):
        r = webui.post("resize", {"file": "a", "out": bad})
        assert r.status_code == 400 and r.json()["detail"].startswith("OptionError: out:"), (bad, r.text)
    for bad in ("../outside/secret", str(secret), str(outside / "secret"), "secret"):
        r = webui.post("resize", {"file": bad, "out": "x"})
        assert r.status_code == 404 and "LoraNotFound" in r.json()["detail"], (bad, r.text)
    for bad in ("../tiny.safetensors", str(webui.ckpt_dir / "tiny.safetensors"), "missing"):
        r = webui.post("extract", {"base": bad, "tuned": "tiny.safetensors", "out": "x"})
        assert r.status_code == 404 and "CheckpointNotFound" in r.json()["detail"], (bad, r.text)
    r = webui.post("merge", {"loras": ["a:0.5", {"name": "../outside/secret", "weight": 1}], "out": "x"})
    assert r.status_code == 404

    # a link in the LoRA folder that points out of it: not an input (not indexed), never an output
    (webui.lora_dir / "link.safetensors").symlink_to(secret)
    webui.client.post(f"{API}/refresh", auth=AUTH)
    assert webui.post("resize", {"file": "link", "out": "x"}).status_code == 404
    before = secret.read_bytes()
    for force in (False, True):
        r = webui.post("resize", {"file": "a", "out": "link", "force": force, "base": "tiny.safetensors"})
        assert r.status_code == 409 and "link" in r.json()["detail"]
    (webui.lora_dir / "dangling.safetensors").symlink_to(outside / "new.safetensors")
    r = webui.post("convert", {"file": "a", "out": "dangling"})
    assert r.status_code == 409 and not (outside / "new.safetensors").exists()
    assert secret.read_bytes() == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.safetensors"]


def test_overwrite_needs_force_and_never_replaces_an_input(webui):
    assert webui.run("convert", {"file": "b", "out": "b2"})["state"] == "finished"
    written = (webui.lora_dir / "b2.safetensors").stat().st_mtime_ns
    r = webui.post("convert", {"file": "b", "out": "b2"})
    assert r.status_code == 409 and r.json()["detail"].startswith("FileExistsError: b2.safetensors exists")
    for force in (False, True):
        r = webui.post("convert", {"file": "b", "out": "b", "force": force})
        assert r.status_code == 409 and "overwrite an input" in r.json()["detail"]
    time.sleep(0.01)
    st = webui.run("convert", {"file": "b", "out": "b2", "force": True, "dtype": "fp16"})
    assert st["state"] == "finished" and (webui.lora_dir / "b2.safetensors").stat().st_mtime_ns != written
    with TensorFile(webui.lora_dir / "b2.safetensors") as tf:
        assert {tf.dtype(k) for k in tf.keys()} == {torch.float16}
    # the same output as a job still queued
    with call_queue.queue_lock:  # a generation is running: the resize waits for it
        first = webui.post("resize", {"file": "a", "out": "same", "base": "tiny.safetensors"})
        assert first.status_code == 200
        r = webui.post("convert", {"file": "b", "out": "same", "force": True})
        assert r.status_code == 409 and first.json()["id"] in r.json()["detail"]
        assert webui.runner.get(first.json()["id"]).state == "queued"
    assert webui.wait(first.json()["id"])["state"] == "finished"


def test_refusals_are_named_with_their_status(webui):
    cases = [("nope", {}, 404, "unknown tool"),
             ("resize", {"file": "a", "out": "x", "rank": 0}, 400, "OptionError: rank: must be at least 1"),
             ("resize", {"file": "a", "out": "x", "device": "cuda"}, 400, "OptionError: device: is not an option"),
             ("resize", {"out": "x"}, 400, "OptionError: file: is required"),
             ("resize", {"file": "a", "out": "x", "dynamic_method": "best"}, 400, "OptionError: dynamic_method"),
             ("merge", {"loras": "a", "out": "x"}, 400, "OptionError: loras: must be a non-empty list"),
             ("merge", {"loras": ["a:foo=1"], "out": "x"}, 400, "ToolError: a: unknown weight item foo="),
             ("merge", {"loras": [{"name": "a", "weight": "high"}], "out": "x"}, 400, "weight must be a number"),
             ("bake", {"base": "tiny.safetensors", "loras": ["a"], "out": "a"}, 200, "")]
    for tool, body, status, detail in cases:
        r = webui.post(tool, body)
        assert r.status_code == status and detail in r.text, (tool, body, r.text)
    for sub in ("one", "two"):  # the same stem in two sub-folders: only the path tells them apart
        (webui.lora_dir / sub).mkdir()
        shutil.copy(webui.lora_dir / "b.safetensors", webui.lora_dir / sub / "c.safetensors")
    webui.client.post(f"{API}/refresh", auth=AUTH)
    r = webui.post("convert", {"file": "c", "out": "y"})
    assert r.status_code == 409 and r.json()["detail"].startswith("AmbiguousName:")
    assert webui.run("convert", {"file": "two/c", "out": "y"})["state"] == "finished"

    # errors found by the tool itself end the job with the error's name and one line; nothing is written
    st = webui.run("bake", {"base": "tiny.safetensors", "loras": ["a:0.5", "xl"], "out": "mixed"})
    assert st["state"] == "failed" and st["error_type"] == "FamilyMismatchError"
    assert st["error"].startswith("FamilyMismatchError: ") and "\n" not in st["error"]
    assert not (webui.ckpt_dir / "mixed.safetensors").exists()
    assert not [p for p in webui.ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert webui.client.get(f"{API}/tools/jobs/nope", auth=AUTH).status_code == 404


def test_bake_writes_to_the_checkpoint_folder_and_refreshes_the_checkpoint_list(webui, files):
    st = webui.run("bake", {"base": "tiny.safetensors", "loras": [{"name": "a", "weight": 0.5}, "b:te=1:unet=-1"],
                            "out": "tiny-baked"})
    assert st["state"] == "finished" and st["output"] == "tiny-baked.safetensors", st
    assert "tiny-baked.safetensors" in sd_models.checkpoints_list   # the WebUI lists it without a restart
    baked = load_file(webui.ckpt_dir / "tiny-baked.safetensors")[0]
    base = load_file(files["ckpt"])[0]
    a, b = load_file(files["a"])[0], load_file(files["b"])[0]
    key = next(k for k in module_keys(a) if "attn2_to_k" in k)
    ck_key = next(k for k in base if k.endswith(".attn2.to_k.weight") and "input_blocks.1." in k)
    assert key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    want = base[ck_key].double() + 0.5 * kohya_delta(a, key).reshape(base[ck_key].shape)
    torch.testing.assert_close(baked[ck_key].double(), want, atol=1e-6, rtol=1e-6)
    vkey = next(k for k in module_keys(b) if "attn1_to_v" in k and "down_blocks_0_attentions_0" in k)
    ck_v = ck_key.replace("attn2.to_k", "attn1.to_v")
    torch.testing.assert_close(baked[ck_v].double(), base[ck_v].double() - kohya_delta(b, vkey), atol=1e-6, rtol=1e-6)
    meta = json.loads(load_file(webui.ckpt_dir / "tiny-baked.safetensors")[1]["ss_baked_loras"])
    assert [(m["file"], m["te"], m["unet"]) for m in meta] == [("a.safetensors", 0.5, 0.5), ("b.safetensors", 1, -1)]


# -- the model lock and the progress bar ---------------------------------------------------------------------


def test_svd_tools_hold_the_queue_lock_drive_the_progress_bar_and_stop(webui, files, monkeypatch):
    reached, release = threading.Event(), threading.Event()
    original = wtools.WebUIToolHost.progress

    def progress(self, job):
        original(self, job)
        if job.done == 1 and not reached.is_set():
            reached.set()
            release.wait(TIMEOUT)

    monkeypatch.setattr(wtools.WebUIToolHost, "progress", progress)
    job_id = webui.post("resize", {"file": "a", "out": "slow", "base": "tiny.safetensors"}).json()["id"]
    assert reached.wait(TIMEOUT)
    st = webui.client.get(f"{API}/tools/jobs/{job_id}", auth=AUTH).json()
    layers = len(module_keys(load_file(files["a"])[0]))
    assert st["state"] == "running" and st["done"] == 1 and st["total"] == layers and st["stage"] == "resize"
    assert (shared.state.job, shared.state.job_count, shared.state.job_no) == (wtools.JOB_NAME, layers, 1)
    assert "resize slow.safetensors" in webui.client.get("/sdapi/v1/progress", auth=AUTH).json()["textinfo"]
    assert not call_queue.queue_lock.acquire(blocking=False)   # a generation would wait
    # a tool that only streams files takes no lock: it runs after this one, in order, and so waits too
    conv = webui.post("convert", {"file": "b", "out": "c"}).json()["id"]
    assert webui.runner.get(conv).state == "queued"
    r = webui.client.post(f"{API}/tools/jobs/{job_id}/stop", auth=AUTH)
    assert r.status_code == 200
    release.set()
    st = webui.wait(job_id)
    assert st["state"] == "stopped" and st["error_type"] == "JobStopped"
    assert webui.wait(conv)["state"] == "finished"   # (its temp file would be in the folder while it runs)
    assert not (webui.lora_dir / "slow.safetensors").exists()
    assert not [p for p in webui.lora_dir.iterdir() if p.name.endswith(".tmp")]
    assert shared.state.job == ""

    # the WebUI's Interrupt stops a tool that holds the lock, like a generation
    reached.clear()
    release.clear()
    job_id = webui.post("resize", {"file": "a", "out": "slow", "base": "tiny.safetensors"}).json()["id"]
    assert reached.wait(TIMEOUT)
    shared.state.interrupt()
    release.set()
    assert webui.wait(job_id)["state"] == "stopped"
    # without the lock nothing else watches shared.state: a bake is not stopped by a generation's Interrupt
    with call_queue.queue_lock:
        st = webui.run("bake", {"base": "tiny.safetensors", "loras": ["a"], "out": "while-locked"})
    assert st["state"] == "finished"


# -- the tab -----------------------------------------------------------------------------------------------


def handler(component, event: str = "click"):
    return next(e for e in component.events if e.name == event)


def test_tools_section_is_built_in_the_tab_and_runs_a_resize(webui):
    (tab, title, elem_id), = script_callbacks.ui_tabs_callback()
    assert (title, elem_id) == ("LoRA Workshop", "lora_workshop")
    find = gradio_standin.find
    selector = find(tab, "lora_workshop_tools_tool")
    assert selector.choices == list(TOOLS)
    file_picker = find(tab, "lora_workshop_tools_resize_file")
    assert file_picker.choices == ["a", "b", "xl"]
    assert find(tab, "lora_workshop_tools_resize_base").choices == [tools_ui.NONE, "tiny.safetensors"]
    assert find(tab, "lora_workshop_tools_bake_loras").multiselect is True
    assert find(tab, "lora_workshop_tools_resize_rank").value == 32
    assert find(tab, "lora_workshop_tools_resize_dynamic_method").choices == \
        ["fixed rank", "sv_ratio", "sv_fro", "sv_cumulative"]
    for t in TOOLS.values():  # every option offered on the tab has its element, and only those
        for o in t.options:
            present = [b for b in tab.walk() if b.elem_id == f"lora_workshop_tools_{t.name}_{o.name}"]
            assert len(present) == (1 if "tab" in o.surfaces else 0), (t.name, o.name)

    groups = handler(selector, "change")
    shown = groups.fn("bake")
    assert [u["visible"] for u in shown] == [t == "bake" for t in TOOLS]

    run = handler(find(tab, "lora_workshop_tools_run"))
    values = {}
    for comp in run.inputs[1:]:
        values[comp.elem_id] = comp.value
    values["lora_workshop_tools_resize_file"] = "a"
    values["lora_workshop_tools_resize_out"] = "from-tab"
    values["lora_workshop_tools_resize_rank"] = 2.0   # gradio's Number gives floats
    values["lora_workshop_tools_resize_base"] = "tiny.safetensors"
    message = run.fn("resize", *[values[c.elem_id] for c in run.inputs[1:]])
    assert "Queued resize -&gt; from-tab.safetensors" in message
    job = webui.runner.latest()
    assert job.wait(TIMEOUT) and job.state == "finished", job.error
    assert job.values["rank"] == 2 and job.values["dynamic_method"] is None and job.values["conv_rank"] is None

    status_html, log = handler(find(tab, tools_ui.POLL_ID)).fn()
    assert "from-tab.safetensors" in status_html and "finished" in status_html and "energy kept overall" in log
    refreshed = handler(find(tab, "lora_workshop_tools_files")).fn()
    assert any(u["choices"] == ["a", "b", "from-tab", "xl"] for u in refreshed)
    again = run.fn("resize", *[values[c.elem_id] for c in run.inputs[1:]])
    assert "lw-error" in again and "exists" in again



def test_saved_ui_defaults_leave_each_tool_at_its_declared_defaults(webui):
    """The WebUI records the tab's values by tab and label (ui-config.json) and gives a recorded value to
    every later component with that label: tools share labels ("Rank", "Output name"), yet each keeps its
    own default, at the first start and the next (with a file that recorded other values)."""
    from modules import ui_loadsave

    def defaults_after(settings: dict) -> None:
        (tab, _, elem_id), = script_callbacks.ui_tabs_callback()
        ui_loadsave.UiLoadsave(settings=settings).add_block(tab, elem_id)
        find = gradio_standin.find
        assert find(tab, "lora_workshop_tools_tool").value == "resize"  # the form shown is resize's
        for t in TOOLS.values():
            for o in t.on("tab"):
                want = tools_ui.start_value(o)
                kind = tools_ui.widget(o)
                want = [] if kind == "loras" else ("" if want is None else want) if kind == "text" else want
                assert find(tab, f"lora_workshop_tools_{t.name}_{o.name}").value == want, (t.name, o.name)

    defaults_after({})
    defaults_after({"lora_workshop/Tool/value": "merge", "lora_workshop/Save as/value": "fp32",
                    "lora_workshop/Dynamic rank/value": "sv_fro"})

# -- the declarations without a host --------------------------------------------------------------------------


def test_form_and_api_values_follow_the_declarations():
    merge = TOOLS["merge"]
    body = tools_ui.form_to_body("merge", {
        "loras": ["a", "b", "c"], "loras_weights": "0.5\n\nte=1:unet=0", "out": " m ", "rank": 0,
        "conv_rank": 0, "dynamic_method": "fixed rank", "dynamic_param": 0, "min_norm": 0.0,
        "base": tools_ui.NONE, "family": "from the file", "dtype": "bf16", "force": False})
    assert body == {"loras": ["a:0.5", "b", "c:te=1:unet=0"], "out": "m", "min_norm": 0.0, "dtype": "bf16",
                    "force": False}
    values = coerce(merge, body)
    assert values["rank"] is None and values["dtype"] == "bf16" and values["device"] is None
    assert set(values) == {o.name for o in merge.options}
    assert coerce(TOOLS["resize"], {"file": "x", "out": "y", "rank": 8.0})["rank"] == 8
    for bad, msg in (({"file": "x", "out": "y", "rank": True}, "whole number"),
                     ({"file": "x", "out": "y", "min_norm": float("nan")}, "finite"),
                     ({"file": "x", "out": "y", "rank": None}, "cannot be null"),
                     ([], "JSON object")):
        with pytest.raises(OptionError, match=msg):
            coerce(TOOLS["resize"], bad)
    with pytest.raises(OptionError, match="at most 1"):
        coerce(TOOLS["extract"], {"base": "x", "tuned": "y", "out": "z", "clamp_quantile": 1.5})
