"""Training inside the stand-in WebUI: the job runner, the WebUI host, the API routes and the tab's helpers.

A tiny real SD1 (ldm UNet, HF CLIP behind a WithCustomWords-style wrapper, diffusers VAE) is laid
out like the WebUI's ``shared.sd_model``; jobs run in their background thread exactly as in the
WebUI, and tests pause them at a chosen step (a gate in the host's progress hook) to look at
``shared.state``, the queue lock and the API while a job runs.  What the host does with the loaded model
(captions, clip skip, v2, latents, samplers): test_webui_training_model.py.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import call_queue, processing, script_callbacks, shared  # noqa: E402
from modules.options import OptionInfo  # noqa: E402

from lib_lora.fileio import read_header  # noqa: E402
from lib_lora.hosts import webui_settings as settings  # noqa: E402
from lib_lora.hosts import webui_training as wt  # noqa: E402
from lib_lora.hosts import webui_trainable as trainable  # noqa: E402
from lib_lora.training import jobs, ui, ui_views  # noqa: E402
from lib_lora.training.errors import RequestError  # noqa: E402
from lib_lora.training.host import TrainingHost  # noqa: E402
from lib_lora.training.request import build_request  # noqa: E402
from loras import same, snapshot  # noqa: E402
from train_support import make_dataset  # noqa: E402

pytest.importorskip("fastapi")
from webui_training_support import TIMEOUT, Gate, request, unet_hooks  # noqa: E402


# -- the API, end to end ---------------------------------------------------------------------------------


def test_train_via_api_until_finished(training_webui, sd_model, data):
    client = training_webui.start()
    before = snapshot(sd_model)
    seen = []
    processing.process_callbacks.append(lambda p: seen.append(
        (unet_hooks(sd_model), p.disable_extra_networks, "cached_c" in vars(p), p.prompt, p.negative_prompt,
         p.steps, p.seed, p.width, p.height, sd_model.cond_stage_model.wrapped.transformer.training)))

    r = client.post("/lora-workshop/v1/train", json=request(
        data, sample_every_n_steps=2, sample_prompts=["zkx, red square --n blurry --s 3 --d 7"], save_state=True))
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert r.json()["name"] == "zkx" and r.json()["total"] == 4
    st = training_webui.wait(job_id)

    assert st["state"] == "finished", st
    assert (st["step"], st["total"], st["error"], st["model_untouched"]) == (4, 4, None, True)
    assert len(st["loss_history"]) == 4 and all(torch.isfinite(torch.tensor(v)) for _, v in st["loss_history"])
    assert st["output"] == "zkx.safetensors" and st["state_file"] == "zkx-state.safetensors"
    assert (training_webui.lora_dir / "zkx.safetensors").is_file()
    assert "/" not in st["output"] and not any("path" in s for s in st["samples"])  # no absolute paths leak

    # sample images: the WebUI's own txt2img, with the LoRA attached and extra networks off
    assert [(s["step"], s["url"]) for s in st["samples"]] == [
        (2, f"/lora-workshop/v1/train/{job_id}/samples/0"), (4, f"/lora-workshop/v1/train/{job_id}/samples/1")]
    img = client.get(st["samples"][1]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content[:4] == b"\x89PNG"
    assert client.get(f"/lora-workshop/v1/train/{job_id}/samples/2").status_code == 404
    assert len(seen) == 2
    for hooks, no_extra, private_cache, prompt, negative, steps, seed, w, h, te_training in seen:
        assert hooks > 0 and no_extra and private_cache
        assert (prompt, negative, steps, seed, w, h) == ("zkx, red square", "blurry", 3, 7, 64, 64)
        assert te_training is False  # the trainer switched the LoRA (and the model) to eval for samples

    # the library was refreshed: the new file is a card and in the API; the state file is neither
    names = [e["name"] for e in client.get("/lora-workshop/v1/loras").json()]
    assert names == ["zkx"]
    assert [i["name"] for i in training_webui.runner.host.workshop.page.list_items()] == ["zkx"]
    meta = read_header(training_webui.lora_dir / "zkx.safetensors").metadata
    assert meta["ss_sd_model_name"] == "tiny.safetensors" and meta["ss_new_sd_model_hash"] == "ab" * 32
    assert meta["ss_steps"] == "4" and meta["ss_sd_model_hash"] == "12345678"

    # the model is exactly as before; shared.state was ended
    assert same(before, snapshot(sd_model)) and unet_hooks(sd_model) == 0
    assert shared.state.job == "" and shared.state.job_count == 0 and "finished" in shared.state.textinfo
    assert shared.total_tqdm._tqdm is None  # the samples' console bar was closed, as after any txt2img
    assert client.get("/lora-workshop/v1/train").json()["jobs"][0]["state"] == "finished"
    assert training_webui.runner.get(job_id).trainer.model is None  # a kept status never pins the model in memory


def _builtin_lora_editor():
    """The stand-in of the built-in Lora extension's card editor (extensions-builtin is not a package)."""
    import importlib.util
    path = STUB / "extensions-builtin" / "Lora" / "ui_edit_user_metadata.py"
    spec = importlib.util.spec_from_file_location("stub_builtin_lora_ui_edit_user_metadata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoraUserMetadataEditor


def test_cards_show_the_resolution_and_buckets_of_a_trained_file(training_webui, data):
    """WebUI 1.10.1's Lora card takes its resolution row from ss_bucket_info's "buckets"; ours shows
    ss_resolution and the buckets.  Both rows appear for a file trained here."""
    client = training_webui.start()
    body = request(data, name="bk", max_train_steps=2, dataset={
        "train_dir": str(data), "resolution": 64, "enable_buckets": True, "min_bucket_reso": 64,
        "max_bucket_reso": 128})
    st = training_webui.wait(client.post("/lora-workshop/v1/train", json=body).json()["id"])
    assert st["state"] == "finished", st
    page = training_webui.base.script.workshop.page
    page.refresh()
    page.items["bk"] = page.create_item("bk")
    assert page.items["bk"]["metadata"]["ss_bucket_info"]["buckets"] == {"0": {"resolution": [64, 64], "count": 4}}

    builtin = dict(_builtin_lora_editor()(None, "txt2img", page).get_metadata_table("bk"))
    assert builtin["Resolution:"] == "64x64" and builtin["Dataset size:"] == 4
    assert builtin["Kohya module:"] == "networks.lora" and "Clip skip:" not in builtin  # "None" is not shown
    ours = dict(page.create_user_metadata_editor(None, "txt2img").get_metadata_table("bk"))
    assert (ours["Resolution:"], ours["Buckets:"]) == ("(64, 64)", "64x64 (4)")


def test_second_job_409_progress_in_shared_state_and_queue_lock_held(training_webui, sd_model, data, monkeypatch):
    # "training only": the lock is the job's until it ends (test_webui_live.py covers "generation first")
    shared.opts.add_option(settings.OPT_TRAIN_PRIORITY, OptionInfo("Training only"))
    client = training_webui.start()
    gate = Gate(monkeypatch, at=2)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()

    r = client.post("/lora-workshop/v1/train", json=request(data, "other"))
    assert r.status_code == 409 and r.json()["detail"] == "a training job is already running: zkx"

    st = shared.state
    assert (st.job, st.job_count, st.job_no) == (wt.JOB_NAME, 4, 2)
    assert "step 2/4" in st.textinfo and "loss" in st.textinfo and "ETA" in st.textinfo
    prog = client.get("/sdapi/v1/progress").json()
    job = training_webui.runner.get(job_id)
    assert prog["progress"] == pytest.approx(0.51) and prog["textinfo"] == st.textinfo
    assert prog["eta_relative"] == pytest.approx(job.eta, abs=2.0)  # the WebUI's ETA is the job's

    # a generation (anything taking the queue lock) waits for the job
    acquired = {}

    def txt2img():
        with call_queue.queue_lock:
            acquired["state"] = training_webui.runner.get(job_id).state

    t = threading.Thread(target=txt2img)
    t.start()
    time.sleep(0.3)
    assert not acquired and t.is_alive()
    gate.release.set()
    t.join(TIMEOUT)
    assert acquired["state"] == "finished"
    assert training_webui.wait(job_id)["state"] == "finished"


def test_stop_stop_and_save_and_resume(training_webui, sd_model, data, monkeypatch):
    client = training_webui.start()
    before = snapshot(sd_model)

    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data, max_train_steps=5, save_state=True)).json()["id"]
    gate.wait()
    r = client.post(f"/lora-workshop/v1/train/{job_id}/stop", json={"save": False})
    assert r.status_code == 200 and r.json()["stop_requested"] == "stop"
    gate.release.set()
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"]) == ("stopped", 1, None)
    assert not list(training_webui.lora_dir.glob("*.safetensors"))

    gate = Gate(monkeypatch, at=2)
    job_id = client.post("/lora-workshop/v1/train", json=request(data, max_train_steps=5, save_state=True)).json()["id"]
    gate.wait()
    assert client.post(f"/lora-workshop/v1/train/{job_id}/stop", json={"save": True}).status_code == 200
    assert client.get(f"/lora-workshop/v1/train/{job_id}").json()["state"] == "saving"
    gate.release.set()
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"], st["state_file"]) == \
        ("stopped", 2, "zkx.safetensors", "zkx-state.safetensors")
    assert read_header(training_webui.lora_dir / "zkx.safetensors").metadata["ss_steps"] == "2"

    # resume from the state file: its stored settings, continuing at step 2
    r = client.post("/lora-workshop/v1/train", json={"resume_from": "zkx-state.safetensors"})
    assert r.status_code == 200, r.text
    st = training_webui.wait(r.json()["id"])
    assert (st["state"], st["step"], st["total"], st["resumed_from"]) == ("finished", 5, 5, "zkx-state.safetensors")
    assert any("resumed at step 2" in line for line in st["log"])
    assert st["loss_history"][0][0] == 3  # steps 3..5 were trained by this job
    assert read_header(training_webui.lora_dir / "zkx.safetensors").metadata["ss_steps"] == "5"
    assert same(before, snapshot(sd_model)) and unet_hooks(sd_model) == 0

    r = client.post("/lora-workshop/v1/train", json={"resume_from": "../zkx-state.safetensors"})
    assert r.status_code == 400 and "inside the LoRA folder" in r.json()["detail"]


def test_job_queues_behind_a_generation_and_can_be_cancelled_there(training_webui, data):
    client = training_webui.start()
    with call_queue.queue_lock:                                  # a generation is running
        job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
        time.sleep(0.2)
        assert client.get(f"/lora-workshop/v1/train/{job_id}").json()["state"] == "queued"
        assert client.post(f"/lora-workshop/v1/train/{job_id}/stop", json={}).status_code == 200
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"]) == ("stopped", 0, None)
    assert "stopped before it started" in st["log"][-1]
    assert shared.state.job == ""                                # shared.state was never taken over


def test_webui_interrupt_stops_and_saves(training_webui, data, monkeypatch):
    client = training_webui.start()
    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    client.post("/sdapi/v1/interrupt")                         # the WebUI's Interrupt button / API
    assert shared.state.interrupted
    gate.release.set()
    st = training_webui.wait(job_id)
    assert (st["state"], st["output"]) == ("stopped", "zkx.safetensors")
    assert st["step"] in (1, 2)
    assert any("interrupted" in line for line in st["log"])


# -- refusing ----------------------------------------------------------------------------------------------


def test_bad_requests_are_400_with_the_problem_named(training_webui, data, tmp_path):
    client = training_webui.start()
    bad = make_dataset(tmp_path / "bad", n=1, repeats=1)
    (bad / "1_zkx" / "broken.png").write_bytes(b"not a png")

    def post(body):
        r = client.post("/lora-workshop/v1/train", json=body)
        return r.status_code, r.json().get("detail", "")

    code, detail = post(request(bad))
    assert code == 400 and "broken.png" in detail
    code, detail = post(request(tmp_path / "nowhere"))
    assert code == 400 and "dataset folder not found" in detail
    for name in ("../x", "a/b", "..\\x", "c:x", ""):
        code, detail = post(request(data, name))
        assert code == 400, name
    assert "plain file name" in post(request(data, "../x"))[1]
    assert post({**request(data), "output_dir": "/tmp"}) == (
        400, "unknown option 'output_dir' (output always goes to the LoRA folder; set output_name)")
    assert post({**request(data), "network": {"rank": "big"}}) == (400, "network.rank: expected an integer, got 'big'")
    assert post({**request(data), "lr_scheduler": "sometimes"})[0] == 400
    assert not list(training_webui.lora_dir.iterdir())
    assert training_webui.runner.jobs() == []

    (training_webui.lora_dir / "zkx.safetensors").write_bytes(b"x")
    code, detail = post(request(data))
    assert code == 409 and "already exists" in detail

    r = client.post("/lora-workshop/v1/train/validate", json=request(bad))
    assert r.status_code == 200
    body = r.json()
    assert not body["summary"]["ok"] and any("broken.png" in (p["path"] or "") for p in body["problems"])
    assert client.get("/lora-workshop/v1/train/nope").status_code == 404


def test_refusals(training_webui, sd_model, monkeypatch):
    client = training_webui.start()

    def post():
        r = client.post("/lora-workshop/v1/train", json={"output_name": "x"})
        return r.status_code, r.json()["detail"]

    monkeypatch.setattr(shared, "sd_model", None)
    assert post() == (409, "no model is loaded: load an SD1, SD2 or SDXL checkpoint first")
    monkeypatch.setattr(shared, "sd_model", sd_model)
    monkeypatch.setattr(shared.cmd_opts, "medvram", True)
    code, detail = post()
    assert code == 409 and "--lowvram / --medvram" in detail
    monkeypatch.setattr(shared.cmd_opts, "medvram", False)
    shared.opts.set("fp8_storage", "Enable")
    code, detail = post()
    assert code == 409 and "FP8" in detail
    shared.opts.set("fp8_storage", "Enable for SDXL")
    assert trainable.refusal(sd_model) is None   # an SD1 model is not stored in fp8 by that setting

    def fake(**kw):
        return types.SimpleNamespace(**{"is_sd1": False, "is_sd2": False, "is_sdxl": False, "is_sd3": False, **kw})

    assert "cannot be trained on" in trainable.refusal(fake(is_sd3=True))
    embedder = types.SimpleNamespace(input_key="aesthetic_score")
    refiner = fake(is_sdxl=True, conditioner=types.SimpleNamespace(embedders=[embedder]))
    assert "SDXL refiner" in trainable.refusal(refiner)
    inpaint = fake(is_sd1=True, model=types.SimpleNamespace(diffusion_model=nn.Conv2d(9, 4, 1)))
    assert "9 input channels" in trainable.refusal(inpaint)
    assert "Cannot train" not in training_webui.runner.host.describe()


def test_routes_use_the_api_auth(training_webui, data):
    client = training_webui.start(auth="user:secret")
    assert client.post("/lora-workshop/v1/train", json=request(data)).status_code == 401
    assert client.get("/lora-workshop/v1/train").status_code == 401
    r = client.post("/lora-workshop/v1/train/validate", json=request(data), auth=("user", "secret"))
    assert r.status_code == 200 and r.json()["summary"]["train_images"] == 4


# -- the runner without the WebUI -------------------------------------------------------------------------


class FailingHost(TrainingHost):
    def __init__(self, out: Path):
        self.out, self.after_calls, self.lock_obj = out, 0, threading.Lock()

    def lock(self):
        return self.lock_obj

    def output_dir(self):
        return self.out

    def build_model(self, job):
        raise RuntimeError("boom\nsecond line")

    def after(self, job):
        self.after_calls += 1

    def log(self, message):
        pass


def test_failure_is_one_line_and_the_lock_is_released(tmp_path, data):
    h = FailingHost(tmp_path)
    runner = jobs.JobRunner(h)
    job = runner.start(request(data))
    assert job.wait(TIMEOUT)
    st = job.status()
    assert (st["state"], st["error"], h.after_calls) == ("failed", "RuntimeError: boom", 1)
    assert h.lock_obj.acquire(blocking=False)
    assert runner.active() is None


def test_presets_and_form_round_trip(data, tmp_path):
    for preset in ("sd15", "sdxl"):
        values = ui.preset_values(preset)
        values["output_name"] = "mine"
        values["dataset.train_dir"] = str(data)
        req = ui.form_to_request(values, preset)
        json.dumps(req)
        cfg = build_request(req, tmp_path).config
        assert (cfg.network.rank, cfg.network.alpha, cfg.optimizer, cfg.lr_scheduler) == (32, 16, "AdamW", "cosine")
        assert cfg.output_dir == tmp_path and cfg.output_name == "mine" and cfg.max_train_epochs == 10
        assert (cfg.gradient_checkpointing, cfg.lean_frozen_layers) == (False, None)   # None: on CPU only
        assert values["lean_frozen_layers"] == "auto"
        if preset == "sd15":
            assert (cfg.dataset.resolution, cfg.network.train_text_encoder, cfg.text_encoder_lr) == (512, True, 5e-5)
        else:
            assert (cfg.dataset.resolution, cfg.network.train_text_encoder, cfg.text_encoder_lr) == (1024, False, None)
    for choice, lean in (("on", True), ("off", False)):
        values = dict(ui.preset_values("sd15"), output_name="mine", lean_frozen_layers=choice,
                      gradient_checkpointing=True, **{"dataset.train_dir": str(data)})
        cfg = build_request(ui.form_to_request(values), tmp_path).config
        assert (cfg.lean_frozen_layers, cfg.gradient_checkpointing) == (lean, True)
        assert ui.to_form("lean_frozen_layers", lean) == choice
    assert build_request({"output_name": "x", "dataset": {"train_dir": str(data)}}, tmp_path,
                              family="sdxl").preset == "sdxl"
    # a length given in steps is the length: the preset's 10 epochs do not override it
    cfg = build_request({"output_name": "x", "dataset": {"train_dir": str(data)}, "max_train_steps": 3},
                             tmp_path).config
    assert (cfg.max_train_steps, cfg.max_train_epochs) == (3, None)
    cfg = build_request({"output_name": "x", "dataset": {"train_dir": str(data)}, "max_train_steps": 3,
                              "max_train_epochs": 2}, tmp_path).config
    assert (cfg.max_train_steps, cfg.max_train_epochs) == (3, 2)
    with pytest.raises(RequestError, match="nothing to train"):
        build_request({"output_name": "x", "dataset": {"train_dir": str(data)},
                            "network": {"train_unet": False, "train_text_encoder": False}}, tmp_path)


def test_tab_helpers_without_gradio(data):
    img = ui_views.loss_plot([[i, 1.0 / i] for i in range(1, 300)])
    assert img.size == (640, 240) and img.getextrema() != ((250, 250),) * 3
    assert ui_views.loss_plot([]).size == (640, 240)
    assert jobs.downsample([1.0] * 1000, 200)[-1] == [1000, 1.0] and len(jobs.downsample([1.0] * 1000, 200)) == 200
    from lib_lora.training.dataset import DatasetConfig
    from lib_lora.training.scan import validate
    summary, problems = validate(DatasetConfig(data, resolution=64, enable_buckets=False))
    html_out = ui_views.summary_html(summary, problems)
    assert "1_zkx" in html_out and "Training images" in html_out
    assert "<script" not in ui_views.summary_html({**summary, "folders": [{"name": "<script>"}]}, [])
    status = ui_views.status_html({"name": "n", "state": "running", "step": 5, "total": 10, "epoch": 1, "loss": 0.1,
                             "avg_loss": 0.12, "lr": 1e-4, "eta": 65, "elapsed": 5, "output": None})
    assert "step 5/10" in status and "ETA 1:05" in status and "width:50.0%" in status


def test_tab_is_registered_and_built_with_gradio(training_webui):
    training_webui.start()
    names = {c.name for c in script_callbacks.callback_map["callbacks_ui_tabs"]}
    assert "lora-workshop/lora_workshop.py/ui_tabs" in names
    pytest.importorskip("gradio")  # the WebUI's gradio 3.41 is not installed here (it pins numpy<2)
    tabs = script_callbacks.ui_tabs_callback()
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("LoRA Workshop", "lora_workshop")]



def test_samples_never_see_a_failed_generations_bundled_embedding(training_webui, sd_model, data):
    """A generation that raised leaves its bundled embeddings registered until the next generation starts;
    a training sample (rendered with extra networks off) between the two must not use them."""
    from modules import sd_hijack

    from lib_lora.bundled import BundledEmbedding
    from lib_lora.hosts.webui_model import token_widths

    client = training_webui.start()
    workshop = training_webui.runner.host.workshop
    (width,) = token_widths(sd_model, "sd1").values()
    msgs = workshop.embeddings.register(sd_model, [("gen_lora", BundledEmbedding("leftover", {"": torch.ones(1, width)}))])
    db = sd_hijack.model_hijack.embedding_db
    assert msgs == [] and "leftover" in db.word_embeddings  # as a failed generation leaves it
    seen = []
    processing.process_callbacks.append(lambda p: seen.append("leftover" in db.word_embeddings))
    r = client.post("/lora-workshop/v1/train", json=request(data, name="noemb", sample_every_n_steps=4,
                                                            sample_prompts=["leftover --s 1"]))
    st = training_webui.wait(r.json()["id"])
    assert st["state"] == "finished", st
    assert seen == [False]
