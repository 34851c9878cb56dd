"""Generate while training, in the stand-in WebUI: the queue lock lent between steps, NAME@live,
"keep this state", progress, interrupts and refusals.

The stand-in (tests/webui_training_support.py) runs the job in its thread under the stub's FIFO queue
lock, which behaves like the WebUI's.  A "generation" here is what the WebUI's txt2img does around
our code: take the queue lock, ``shared.state.begin``, ``reload_model_weights`` (a no-op unless the
checkpoint changes), our extra-network activation with the prompt's ``<lora:>`` items,
``process_images``, deactivation, ``shared.state.end``.  References: the same job run without
generations ("training only"), and the files the trainer itself saves at a step.
"""
from __future__ import annotations

import sys
import threading
import time
import types

import pytest
import torch

from webui_training_support import TIMEOUT, Gate, request, unet_hooks  # the stand-in's path first
from modules import call_queue, processing, sd_models, sd_vae, shared  # noqa: E402
from modules.options import OptionInfo  # noqa: E402

from lib_lora.fileio import load_file, read_header  # noqa: E402
from lib_lora.hosts import webui_settings as settings  # noqa: E402
from lib_lora.hosts import webui_interleave as interleave  # noqa: E402
from lib_lora.hosts import webui_training as wt  # noqa: E402
from lib_lora.live import INFOTEXT_KEY  # noqa: E402
from lib_lora.training import ui_views  # noqa: E402
from loras import same, snapshot  # noqa: E402


def generation_first(seconds: float = 0.0) -> None:
    shared.opts.add_option(settings.OPT_TRAIN_PRIORITY, OptionInfo("Generation first"))
    shared.opts.add_option(settings.OPT_TRAIN_YIELD_SECONDS, OptionInfo(seconds))


def waiting_for_the_lock(n: int = 1) -> None:
    deadline = time.time() + TIMEOUT
    while len(call_queue.queue_lock._pending_threads) < n:
        assert time.time() < deadline, "nobody queued for the lock"
        time.sleep(0.01)


class Generation(threading.Thread):
    """A txt2img as the WebUI runs it, with ``during(p)`` called while it holds the lock."""

    def __init__(self, training_webui, items: list[list[str]], during=None):
        super().__init__(daemon=True)
        self.webui, self.items, self.during = training_webui, items, during
        self.p = self.res = self.error = None
        self.seen: dict = {}

    def run(self) -> None:
        try:
            with call_queue.queue_lock:
                shared.state.begin(job="scripts_txt2img")
                try:
                    ws = self.webui.runner.host.workshop
                    self.p = p = processing.StableDiffusionProcessingTxt2Img(
                        sd_model=shared.sd_model, prompt="zkx, red square", steps=2, width=64, height=64)
                    sd_models.reload_model_weights()  # process_images does this first: a no-op here
                    ws.before_generation()
                    self.res = ws.activate(p, self.items) if self.items else None
                    if self.during is not None:
                        self.during(self)
                    processing.process_images(p)
                    ws.deactivate(p)
                finally:
                    shared.state.end()
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path)[0]


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and same([a[k] for k in sorted(a)], [b[k] for k in sorted(b)])


def uninterrupted(training_webui, data, name: str, **kw) -> dict[str, torch.Tensor]:
    """The same job with the lock held throughout ("training only"): the reference file."""
    shared.opts.add_option(settings.OPT_TRAIN_PRIORITY, OptionInfo("Training only"))
    job_id = training_webui.client.post("/lora-workshop/v1/train", json=request(data, name, **kw)).json()["id"]
    st = training_webui.wait(job_id)
    assert st["state"] == "finished" and st["pauses"] == 0, st
    return tensors(training_webui.lora_dir / f"{name}.safetensors")


def test_a_generation_runs_between_two_steps_with_the_live_lora(training_webui, sd_model, data, monkeypatch):
    client = training_webui.start()
    generation_first()
    before = snapshot(sd_model)
    modes, grads = [m.training for m in sd_model.modules()], [p.requires_grad for p in sd_model.parameters()]
    gate1, gate2 = Gate(monkeypatch, at=1), Gate(monkeypatch, at=2)
    job_id = client.post("/lora-workshop/v1/train", json=request(data, save_every_n_steps=1)).json()["id"]
    job = training_webui.runner.get(job_id)
    gate1.wait()

    def during(g: Generation) -> None:
        st = client.get(f"/lora-workshop/v1/train/{job_id}").json()
        te = sd_model.cond_stage_model.wrapped.transformer
        g.seen.update(step=st["step"], paused=st["paused"], state=st["state"], hooks=unet_hooks(sd_model),
                      modes=[m.training for m in sd_model.modules()],
                      grad=[p.requires_grad for p in sd_model.parameters()],
                      weights=snapshot(sd_model), te_weights=snapshot(te),
                      progress=client.get("/sdapi/v1/progress").json())
        shared.state.interrupt()  # the WebUI's Interrupt, while the generation runs: for the generation only

    gen = Generation(training_webui, [["zkx@live", "1"]], during)
    gen.start()
    waiting_for_the_lock()
    assert job.step == 1 and not job.paused  # the job holds the lock until its next step boundary
    gate1.release.set()
    gen.join(TIMEOUT)
    assert gen.error is None, gen.error
    seen = gen.seen

    # the generation ran at the boundary after step 1, with the job paused and the model as loaded + the live LoRA
    assert (seen["step"], seen["paused"], seen["state"]) == (1, True, "running")
    assert seen["hooks"] == 0 and seen["modes"] == modes and seen["grad"] == grads
    assert not same(seen["weights"], before)  # merged
    assert seen["progress"]["state"]["job"] == "scripts_txt2img"  # /sdapi/v1/progress shows the generation
    assert gen.res.applied == ["zkx@live"] and not gen.res.messages
    h = read_header(training_webui.lora_dir / "zkx-step00000001.safetensors").metadata["sshs_model_hash"]
    assert gen.p.extra_generation_params["Lora hashes"] == f"zkx@live: {h[:12]}"
    assert gen.p.extra_generation_params[INFOTEXT_KEY] == f"zkx@live: job {job_id} step 1 hash {h[:12]}"

    # training went on: its progress is back in shared.state, the interrupt was the generation's
    gate2.wait()
    st = shared.state
    assert (st.job, st.job_no, st.interrupted) == (wt.JOB_NAME, 2, False) and "step 2/4" in st.textinfo
    assert same(snapshot(sd_model), before)  # restored though "restore after every generation" is off
    status = client.get(f"/lora-workshop/v1/train/{job_id}").json()
    assert status["paused"] is False and status["pauses"] == 1 and status["time_paused"] > 0
    assert "lost to 1 generation pause" in ui_views.status_html(status)
    gate2.release.set()
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"]) == ("finished", 4, "zkx.safetensors"), st
    assert same(snapshot(sd_model), before) and unet_hooks(sd_model) == 0 and st["model_untouched"] is True

    # live at step 1 = the file saved at step 1, merged the normal way
    ws = training_webui.runner.host.workshop
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=sd_model, prompt="x")
    res = ws.activate(p, [["zkx-step00000001", "1"]])
    assert res.applied == ["zkx-step00000001"] and same(snapshot(sd_model), seen["weights"])
    ws.activate(p, [])
    assert same(snapshot(sd_model), before)

    # the final file is the one a run without the generation writes
    assert bitwise_equal(tensors(training_webui.lora_dir / "zkx.safetensors"),
                         uninterrupted(training_webui, data, "ref", save_every_n_steps=1))


def test_stopping_during_a_generation_waits_for_it_then_saves(training_webui, sd_model, data, monkeypatch):
    client = training_webui.start()
    generation_first()
    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    inside, finish = threading.Event(), threading.Event()

    def hold(g: Generation) -> None:
        inside.set()
        assert finish.wait(TIMEOUT)

    gen = Generation(training_webui, [], hold)
    gen.start()
    waiting_for_the_lock()
    gate.release.set()
    assert inside.wait(TIMEOUT)
    r = client.post(f"/lora-workshop/v1/train/{job_id}/stop", json={"save": True})
    assert r.status_code == 200 and r.json()["paused"] is True and r.json()["stop_requested"] == "save"
    time.sleep(0.2)
    assert training_webui.runner.get(job_id).active  # waits for the generation
    finish.set()
    gen.join(TIMEOUT)
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"]) == ("stopped", 1, "zkx.safetensors")
    assert gen.error is None and read_header(training_webui.lora_dir / "zkx.safetensors").metadata["ss_steps"] == "1"


def test_keep_this_state_over_the_api_while_the_job_goes_on(training_webui, data, monkeypatch):
    client = training_webui.start()
    gate = Gate(monkeypatch, at=2)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=client.post(f"/lora-workshop/v1/train/{job_id}/keep")))
    t.start()
    time.sleep(0.2)
    assert "r" not in answer  # saved at the next step boundary, not in the middle of a step
    gate.release.set()
    t.join(TIMEOUT)
    r = answer["r"]
    assert r.status_code == 200 and r.json()["file"].startswith("zkx-step0000000"), r.text
    kept = training_webui.lora_dir / r.json()["file"]
    assert r.json()["step"] >= 2 and read_header(kept).metadata["ss_steps"] == str(r.json()["step"])
    assert r.json()["file"][:-len(".safetensors")] in [e["name"] for e in client.get("/lora-workshop/v1/loras").json()]
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"]) == ("finished", 4) and r.json()["file"] in st["saved"]
    late = client.post(f"/lora-workshop/v1/train/{job_id}/keep")
    assert late.status_code == 409 and "finished" in late.json()["detail"]


@pytest.fixture(autouse=True)
def checkpoints(training_webui, monkeypatch, sd_model):
    """Two checkpoints the settings can name, the loaded model the first; a stand-in module for the
    WebUI's embedding training."""
    tiny = sd_models.CheckpointInfo("/webui/models/Stable-diffusion/tiny.safetensors")
    other = sd_models.CheckpointInfo("/webui/models/Stable-diffusion/other.safetensors")
    monkeypatch.setattr(sd_models, "checkpoint_aliases", {"tiny.safetensors [abcdef0123]": tiny,
                                                          "other.safetensors": other})
    monkeypatch.setattr(sd_models, "loads", [])
    monkeypatch.setattr(sd_vae, "loads", [])
    monkeypatch.setattr(sd_model, "sd_model_checkpoint", tiny.filename, raising=False)
    shared.opts.onchange("sd_model_checkpoint", call_queue.wrap_queued_call(lambda: sd_models.reload_model_weights()),
                         call=False)
    shared.opts.add_option("sd_vae", OptionInfo("Automatic"))
    ti = types.ModuleType("modules.textual_inversion.textual_inversion")
    ti.train_embedding = lambda *a, **k: "trained"
    monkeypatch.setitem(sys.modules, ti.__name__, ti)
    return ti


def test_model_changes_and_other_training_are_refused_during_a_job(training_webui, data, monkeypatch, checkpoints):
    client = training_webui.start()
    generation_first()
    original_reload = sd_models.reload_model_weights
    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    assert sd_models.reload_model_weights is not original_reload  # guarded while the job runs

    changed = {}
    setting = threading.Thread(target=lambda: changed.update(
        ok=shared.opts.set("sd_model_checkpoint", "other.safetensors")))  # Settings > Apply: waits for the lock
    refused: dict[str, str] = {}

    def attempts(g: Generation) -> None:
        for label, call in (("vae", lambda: (setattr(shared.opts, "sd_vae", "x.vae"), sd_vae.reload_vae_weights())),
                            ("precision", lambda: sd_models.reload_model_weights(forced_reload=True)),
                            ("refiner", lambda: sd_models.reload_model_weights(
                                info=sd_models.checkpoint_aliases["other.safetensors"])),
                            ("unload", lambda: sd_models.unload_model_weights()),
                            ("embedding", lambda: checkpoints.train_embedding("x"))):
            try:
                call()
            except interleave.ModelChangeRefused as e:
                refused[label] = str(e)
        shared.opts.sd_vae = "Automatic"

    setting.start()
    waiting_for_the_lock()
    gen = Generation(training_webui, [], attempts)
    gen.start()
    waiting_for_the_lock(2)
    gate.release.set()
    setting.join(TIMEOUT)
    gen.join(TIMEOUT)
    assert gen.error is None, gen.error

    assert changed["ok"] is False and shared.opts.sd_model_checkpoint == "tiny.safetensors [abcdef0123]"  # reverted
    assert sorted(refused) == ["embedding", "precision", "refiner", "unload", "vae"]
    assert refused["vae"] == ("LoRA Workshop is training zkx on the loaded model: cannot load another VAE until the "
                              "job ends (stop it in the LoRA Workshop tab, or wait)")
    assert "start another training" in refused["embedding"] and "load another checkpoint" in refused["refiner"]
    assert sd_models.loads == [] and sd_vae.loads == []
    st = training_webui.wait(job_id)
    assert st["state"] == "finished" and any("refused: load another checkpoint" in line for line in st["log"])
    r = client.post("/lora-workshop/v1/train", json=request(data, "second"))  # and after it, training is free again
    assert r.status_code == 200

    # once the job is over the WebUI's own functions are back
    training_webui.wait(r.json()["id"])
    assert sd_models.reload_model_weights is original_reload
    assert shared.opts.set("sd_model_checkpoint", "other.safetensors") is True
    assert sd_models.loads == ["/webui/models/Stable-diffusion/other.safetensors"]


def test_training_only_keeps_the_lock_and_live_names_say_why(training_webui, data, monkeypatch):
    client = training_webui.start()
    shared.opts.add_option(settings.OPT_TRAIN_PRIORITY, OptionInfo("Training only"))
    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    assert client.get(f"/lora-workshop/v1/train/{job_id}").json()["live_name"] == "zkx@live"
    ws = training_webui.runner.host.workshop
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, prompt="x")
    res = ws.activate(p, [["zkx@live", "1"]])  # a generation that did not wait for the lock
    assert res.applied == [] and "weights apply only in generations that run while it pauses" in res.messages[0]
    gen = Generation(training_webui, [["zkx@live", "1"]])
    gen.start()
    waiting_for_the_lock()
    gate.release.set()
    gen.join(TIMEOUT)
    st = training_webui.wait(job_id)
    assert st["pauses"] == 0 and st["state"] == "finished"
    assert gen.res.applied == [] and "no training job with output name 'zkx' is running" in gen.res.messages[0]
    assert "Lora hashes" not in gen.p.extra_generation_params


def test_the_tabs_keep_button_saves_at_the_next_step(training_webui, data, monkeypatch):
    import gradio_standin
    monkeypatch.setitem(sys.modules, "gradio", gradio_standin)
    client = training_webui.start()
    (tab, _, _), = wt.ui_tabs()
    keep = next(e for e in gradio_standin.find(tab, "lora_workshop_keep").events if e.name == "click")
    assert "No training job is running" in keep.fn()
    gate = Gate(monkeypatch, at=1)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    out = {}
    t = threading.Thread(target=lambda: out.update(message=keep.fn()))
    t.start()
    time.sleep(0.1)
    gate.release.set()
    t.join(TIMEOUT)
    assert "Kept step 1 as zkx-step00000001.safetensors; training goes on." in out["message"]
    assert training_webui.wait(job_id)["state"] == "finished" and (training_webui.lora_dir / "zkx-step00000001.safetensors").is_file()


def test_a_generation_that_leaves_the_model_untrainable_stops_the_job_with_its_file(training_webui, data, monkeypatch):
    client = training_webui.start()
    generation_first()
    gate = Gate(monkeypatch, at=2)
    job_id = client.post("/lora-workshop/v1/train", json=request(data)).json()["id"]
    gate.wait()
    sd_unet = types.ModuleType("modules.sd_unet")
    sd_unet.current_unet = None

    def switch_unet(g: Generation) -> None:  # e.g. "SD Unet" set to a TensorRT engine for this generation
        sd_unet.current_unet = object()

    monkeypatch.setitem(sys.modules, "modules.sd_unet", sd_unet)
    gen = Generation(training_webui, [], switch_unet)
    gen.start()
    waiting_for_the_lock()
    gate.release.set()
    gen.join(TIMEOUT)
    st = training_webui.wait(job_id)
    assert (st["state"], st["step"], st["output"]) == ("stopped", 2, "zkx.safetensors"), st
    assert any("after a generation: an alternative UNet (e.g. TensorRT) is active" in line for line in st["log"])
