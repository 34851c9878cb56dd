"""Training inside the stand-in WebUI: the job runner, the WebUI host, the API routes and the tab's helpers.

A tiny real SD1 (ldm UNet, HF CLIP behind a WithCustomWords-style wrapper, diffusers VAE) is laid
out like the WebUI's ``shared.sd_model``; jobs run in their background thread exactly as in the
WebUI, and tests pause them at a chosen step (a gate in the host's progress hook) to look at
``shared.state``, the queue lock and the API while a job runs.
"""
from __future__ import annotations

import contextlib
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


def _words(n: int) -> str:
    return ", ".join(f"tag{i}" for i in range(n))


def test_max_token_length_cuts_and_pads_captions_through_the_webuis_chunks(sd_model):
    """kohya's limit through the WebUI's own prompt chunking: every caption gets exactly N / 75 chunks of 77
    (a longer one cut after its first chunks, a shorter one given empty chunks); unset, as many as it needs.
    Against the stand-in embedder encoding the chunks itself."""
    emb = sd_model.cond_stage_model
    long, short = _words(70), "zkx, red square"    # 70 "tagN," pieces: well over 150 tokens
    chunks = emb.process_texts([long])[0][0]
    assert len(chunks) >= 3

    def one(chunk) -> torch.Tensor:
        return emb._encode(torch.tensor([chunk.tokens]))[0]
    with torch.no_grad():
        for limit, n in ((None, len(chunks)), (75, 1), (150, 2), (225, 3)):
            m = trainable.trainable_model(sd_model, max_token_length=limit)
            ctx = m.encode_text([long, short]).context
            assert ctx.shape[:2] == (2, 77 * n), limit
            for i in range(n):
                assert torch.allclose(ctx[0, 77 * i:77 * (i + 1)], one(chunks[i]), atol=1e-5)
            assert torch.allclose(ctx[1, :77], one(emb.process_texts([short])[0][0][0]), atol=1e-5)
            for i in range(1, n):
                assert torch.allclose(ctx[1, 77 * i:77 * (i + 1)], one(emb.empty_chunk()), atol=1e-5)
            assert m.max_token_length == limit
    assert "process_texts" not in vars(emb)   # the class's own again


def test_caption_chunks_limits_only_its_own_thread_and_gives_back_what_was_there(sd_model):
    """The wrapped process_texts cuts to N / 75 chunks in the training's thread only (the WebUI's img2img token
    counter calls it without the queue lock); what the instance had before comes back, also on an error."""
    emb = sd_model.cond_stage_model
    long = _words(70)
    n_all = len(emb.process_texts([long])[0][0])
    assert n_all >= 3
    other: list[int] = []
    with trainable.caption_chunks([emb], 150):
        assert len(emb.process_texts([long])[0][0]) == 2
        t = threading.Thread(target=lambda: other.append(len(emb.process_texts([long])[0][0])))
        t.start()
        t.join()
    assert other == [n_all] and "process_texts" not in vars(emb)
    own = emb.process_texts          # an instance attribute someone else put there: wrapped, then given back
    emb.process_texts = own
    try:
        with pytest.raises(ZeroDivisionError), trainable.caption_chunks([emb], 75):
            assert len(emb.process_texts([long])[0][0]) == 1
            raise ZeroDivisionError
        assert vars(emb)["process_texts"] is own
    finally:
        vars(emb).pop("process_texts", None)


def test_old_emphasis_switched_on_mid_run_stops_the_limited_encoding(sd_model):
    """The setting can change between steps (a settings change runs in the gap): an encoding with the limit
    then fails with the reason instead of silently encoding without it; unset, it encodes as the WebUI does."""
    m = trainable.trainable_model(sd_model, max_token_length=150)
    shared.opts.add_option("use_old_emphasis_implementation", OptionInfo(False))
    shared.opts.set("use_old_emphasis_implementation", True)
    try:
        with pytest.raises(RuntimeError, match="max_token_length: needs the WebUI's prompt chunking"):
            m.encode_text(["zkx, red square"])
        assert "process_texts" not in vars(sd_model.cond_stage_model)
        with trainable.caption_chunks([sd_model.cond_stage_model], None):
            pass
    finally:
        shared.opts.set("use_old_emphasis_implementation", False)


def test_max_token_length_trains_in_the_webui(training_webui, data):
    """No longer refused: a job with max_token_length 150 (asked for directly or by a config.toml) trains
    and records it; the tab's import fills its field."""
    client = training_webui.start()
    for body in (request(data, max_token_length=150), {**request(data), "config_toml": "max_token_length = 150\n"}):
        r = client.post("/lora-workshop/v1/train/validate", json=body)
        assert r.status_code == 200, r.text
    r = client.post("/lora-workshop/v1/train", json=request(data, max_token_length=150))
    assert r.status_code == 200, r.text
    st = training_webui.wait(r.json()["id"])
    assert st["state"] == "finished", st
    assert read_header(training_webui.lora_dir / st["output"]).metadata["ss_max_token_length"] == "150"
    values, notes = ui.import_files("max_token_length = 150\n", "")
    assert values["max_token_length"] == 150 and not [n for n in notes if "max_token_length" in n]


def test_max_token_length_is_refused_where_the_webui_does_not_chunk(training_webui, data):
    """The WebUI's "old emphasis implementation" encodes without its chunking: refused before queuing."""
    client = training_webui.start()
    shared.opts.add_option("use_old_emphasis_implementation", OptionInfo(False))
    shared.opts.set("use_old_emphasis_implementation", True)
    try:
        r = client.post("/lora-workshop/v1/train", json=request(data, max_token_length=225))
        assert r.status_code == 400 and r.json()["detail"].startswith(
            "max_token_length: needs the WebUI's prompt chunking, which the \"Use old emphasis implementation\""), r.text
        assert client.post("/lora-workshop/v1/train/validate", json=request(data)).status_code == 200
    finally:
        shared.opts.set("use_old_emphasis_implementation", False)
    assert training_webui.runner.jobs() == []


def test_the_tabs_v2_follows_the_loaded_model():
    """kohya's v2 on the tab: ticked for a loaded SD2 model, not for SD1 (where a tick is refused, see below)."""
    assert ui.preset_values("sd15", "sd1")["v2"] is False and ui.preset_values("sd15", "sd2")["v2"] is True
    assert ("v2", "SD2 model (kohya's v2: only confirms the loaded model; refused if it is not SD2)", "bool", {}) \
        in ui.FIELDS
    assert next(f for f in ui.FIELDS if f[0] == "max_token_length")[2] == "opt_int"


def test_a_wrong_v2_is_refused_before_the_model_is_touched(training_webui, sd_model, data, monkeypatch):
    """v2 on the SD1 stand-in: refused by validate and submission, and by build_model before it restores merged
    LoRAs or switches token merging off."""
    client = training_webui.start()
    why = "v2: says SD2, but the checkpoint is SD1 (detected from its weights): leave v2 out"
    for route in ("/lora-workshop/v1/train/validate", "/lora-workshop/v1/train"):
        r = client.post(route, json=request(data, v2=True))
        assert (r.status_code, r.json()["detail"]) == (400, why), route
    assert training_webui.runner.jobs() == []

    host = training_webui.runner.host
    touched = []
    monkeypatch.setattr(host.workshop, "restore", lambda: touched.append("restore") or 0)
    monkeypatch.setattr(sys.modules["modules.sd_models"], "apply_token_merging",
                        lambda *a: touched.append("token merging"), raising=False)
    before = snapshot(sd_model)
    job = types.SimpleNamespace(config=build_request(request(data, v2=True), training_webui.lora_dir).config,
                                log=lambda line: touched.append(line))
    with pytest.raises(RequestError, match="v2: says SD2"):
        host.build_model(job)
    assert touched == [] and host._trained is None
    assert same(snapshot(sd_model), before)


def test_routes_use_the_api_auth(training_webui, data):
    client = training_webui.start(auth="user:secret")
    assert client.post("/lora-workshop/v1/train", json=request(data)).status_code == 401
    assert client.get("/lora-workshop/v1/train").status_code == 401
    r = client.post("/lora-workshop/v1/train/validate", json=request(data), auth=("user", "secret"))
    assert r.status_code == 200 and r.json()["summary"]["train_images"] == 4


# -- the WebUI host's model -------------------------------------------------------------------------------


class FakeEmbedder(nn.Module):
    def __init__(self, attr: str, input_key: str = "txt"):
        super().__init__()
        setattr(self, attr, nn.Linear(2, 2))
        self.input_key, self.is_trainable, self.ucg_rate = input_key, False, 0.1


class FakeConditioner(nn.Module):
    """sgm's GeneralConditioner contract: batch dict in, {"crossattn", "vector"} out; frozen embedders run
    under no_grad unless ``is_trainable``."""

    def __init__(self):
        super().__init__()
        self.embedders = nn.ModuleList([FakeEmbedder("transformer"), FakeEmbedder("model"),
                                        FakeEmbedder("dummy", "original_size_as_tuple")])
        self.seen = []

    def forward(self, batch):
        self.seen.append((batch, [(e.is_trainable, e.ucg_rate) for e in self.embedders]))
        e0 = self.embedders[0]
        with contextlib.nullcontext() if e0.is_trainable else torch.no_grad():
            h = e0.transformer(torch.ones(len(batch["txt"]), 3, 2))
        sizes = torch.cat([batch["original_size_as_tuple"], batch["crop_coords_top_left"],
                           batch["target_size_as_tuple"]], 1)
        return {"crossattn": h, "vector": sizes}


def test_sdxl_text_goes_through_the_conditioner_with_sizes_and_grads():
    unet = nn.Conv2d(4, 4, 1)
    unet.in_channels = 4
    sd = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=True, is_sd3=False,
                               model=types.SimpleNamespace(diffusion_model=unet), conditioner=FakeConditioner(),
                               first_stage_model=nn.Linear(1, 1), alphas_cumprod=torch.linspace(0.99, 0.01, 10),
                               alphas_cumprod_original=torch.linspace(0.9, 0.1, 10), parameterization="v")
    m = trainable.trainable_model(sd, model_map=object())
    assert (m.family, m.prediction, m.resolution, [p for p, _ in m.text_encoders]) == ("sdxl", "v", 1024, ["te1", "te2"])
    assert torch.equal(m.alphas_cumprod, torch.linspace(0.9, 0.1, 10))  # the schedule it was trained with
    sizes = [((832, 1216), (0, 32), (768, 1152)), ((1024, 1024), (8, 0), (1024, 1024))]
    cond = m.encode_text(["a", "b"], sizes)
    batch, flags = sd.conditioner.seen[-1]
    assert batch["txt"] == ["a", "b"]
    assert batch["original_size_as_tuple"].tolist() == [[832, 1216], [1024, 1024]]
    assert batch["crop_coords_top_left"].tolist() == [[0, 32], [8, 0]]
    assert batch["target_size_as_tuple"].tolist() == [[768, 1152], [1024, 1024]]
    assert flags == [(True, 0.0)] * 3                                     # during the call ...
    assert [(e.is_trainable, e.ucg_rate) for e in sd.conditioner.embedders] == [(False, 0.1)] * 3  # ... only
    assert cond.y is not None and cond.y.shape == (2, 6)
    cond.context.sum().backward()
    assert sd.conditioner.embedders[0].transformer.weight.grad is not None  # grads reach the text encoder
    with torch.no_grad():
        assert not m.encode_text(["a"]).context.requires_grad               # the trainer's no_grad wins
        m.encode_text(["miku (vocaloid)"], sizes[:1])
    assert sd.conditioner.seen[-1][0]["txt"] == [r"miku \(vocaloid\)"]   # literal for the prompt parser


def test_sd1_captions_reach_the_encoder_literally(sd_model, monkeypatch):
    """Escaped for the prompt parser, and with textual-inversion names left as words (kohya's reading)."""
    from modules import sd_hijack
    db = sd_hijack.model_hijack.embedding_db
    lookup = {320: [([320], "an embedding named 'a'")]}
    monkeypatch.setattr(db, "ids_lookup", lookup)
    seen = []
    forward = type(sd_model.cond_stage_model).forward

    def spy(self, texts):
        seen.append((texts, dict(db.ids_lookup)))
        return forward(self, texts)

    monkeypatch.setattr(type(sd_model.cond_stage_model), "forward", spy)
    with torch.no_grad():
        trainable.trainable_model(sd_model).encode_text(["a [sketch] of (red:1.2) x", "plain"])
    assert seen == [([r"a \[sketch\] of \(red:1.2\) x", "plain"], {})]
    assert db.ids_lookup is lookup                      # the WebUI's embeddings are back for generation


def test_latents_are_deterministic_and_leave_the_global_rng_alone(sd_model):
    m = trainable.trainable_model(sd_model)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = m.encode_images(pixels)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a, m.encode_images(pixels)) and a.shape == (1, 4, 8, 8)
    assert (m.model_name, m.model_hash, m.legacy_hash, m.resolution) == \
        ("tiny.safetensors", "ab" * 32, "12345678", 512)


def test_sample_prompt_options():
    o = wt.parse_sample_prompt("a cat, photo --n blurry, ugly --w 768 --h 512 --s 28 --l 5.5 --d 9 --ss euler_a",
                               512, 512, 1)
    assert o == {"prompt": "a cat, photo", "negative_prompt": "blurry, ugly", "width": 768, "height": 512,
                 "seed": 9, "steps": 28, "cfg_scale": 5.5, "sampler_name": "Euler a"}
    assert wt.parse_sample_prompt("plain", 64, 64, 3)["prompt"] == "plain"
    assert wt.parse_sample_prompt("x --w wide", 64, 64, 3)["width"] == 64  # malformed options are ignored


# WebUI 1.10.1's sampler names, transcribed from its modules/sd_samplers_kdiffusion.py (samplers_k_diffusion)
# and modules/sd_samplers_timesteps.py (samplers_timesteps) at tag v1.10.1
WEBUI_1_10_1_SAMPLERS = {
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler",
    "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC"}


def test_every_kohya_sampler_renders_with_a_webui_sampler():
    from lib_lora.training.checks import KOHYA_SAMPLERS
    for name in KOHYA_SAMPLERS:
        for o in (wt.parse_sample_prompt("x", 64, 64, 0, sampler=name),
                  wt.parse_sample_prompt(f"x --ss {name}", 64, 64, 0)):
            assert o["sampler_name"] in WEBUI_1_10_1_SAMPLERS, name
    # the two the WebUI has no exact match for: the multistep DPM++ 2M, and DPM2 (singlestep, no added noise)
    assert [wt.parse_sample_prompt("x", 64, 64, 0, sampler=n)["sampler_name"] for n in ("dpmsolver", "dpmsingle")] == \
        ["DPM++ 2M", "DPM2"]


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


# -- clip skip: the run's, not the WebUI's setting, which is given back ------------------------------------------


def _clip_reference(sd_model, texts, skip):
    """sd-scripts' SD1 clip skip, from the HF text model itself: hidden state ``skip`` from the end, final LN."""
    import open_clip
    te = sd_model.cond_stage_model.wrapped.transformer
    out = te(input_ids=open_clip.tokenize(texts), output_hidden_states=True)
    return te.text_model.final_layer_norm(out.hidden_states[-skip]) if skip > 1 else out.last_hidden_state


def test_sd1_encodes_at_the_runs_clip_skip_and_gives_the_users_setting_back(sd_model, monkeypatch):
    monkeypatch.setitem(shared.opts.data, trainable.CLIP_SKIP_OPT, 3)  # the user's Clip skip setting
    with torch.no_grad():
        two = trainable.trainable_model(sd_model, clip_skip=2).encode_text(["a cat", "zkx"]).context
        unset = trainable.trainable_model(sd_model).encode_text(["a cat", "zkx"]).context
        torch.testing.assert_close(two, _clip_reference(sd_model, ["a cat", "zkx"], 2))
        torch.testing.assert_close(unset, _clip_reference(sd_model, ["a cat", "zkx"], 1))  # unset is 1, as kohya
        assert not torch.allclose(two, unset, atol=1e-3)
    assert shared.opts.CLIP_stop_at_last_layers == 3
    assert trainable.trainable_model(sd_model, clip_skip=2).clip_skip == 2
    assert "the WebUI's Clip skip setting (3) stays for generations" in \
        trainable.clip_skip_note(sd_model, "sd1", 2)
    assert trainable.clip_skip_note(sd_model, "sd1", 3) is None

    def fails(*a, **k):
        assert shared.opts.CLIP_stop_at_last_layers == 2
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sd_model.cond_stage_model.wrapped.transformer, "forward", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainable.trainable_model(sd_model, clip_skip=2).encode_text(["a cat"])
    assert shared.opts.CLIP_stop_at_last_layers == 3  # given back on error too


def test_sd2_sets_the_embedders_layer_and_sdxl_holds_clip_skip_sdxl_off(monkeypatch):
    """The WebUI's SD2 embedder ignores its Clip skip setting and stops ``layer_idx`` blocks before the
    end (1: penultimate, sd-scripts' clip skip 1); SDXL's "Clip skip SDXL" would change CLIP-L's layer,
    which sd-scripts never does."""
    seen = []

    class Embedder(nn.Module):
        layer_idx = 1

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.wrapped = Embedder()

        def forward(self, texts):
            seen.append(self.wrapped.layer_idx)
            return torch.zeros(len(texts), 77, 8)

    unet = nn.Conv2d(4, 4, 1)
    unet.in_channels = 4
    sd2 = types.SimpleNamespace(is_sd1=False, is_sd2=True, is_sdxl=False, is_sd3=False, cond_stage_model=Cond(),
                                model=types.SimpleNamespace(diffusion_model=unet), first_stage_model=nn.Linear(1, 1),
                                alphas_cumprod=torch.linspace(0.99, 0.01, 10), parameterization="v")
    monkeypatch.setattr(trainable, "text_encoder_roots", lambda m, f: [("te", nn.Linear(1, 1))])
    for skip in (2, None, 1):
        trainable.trainable_model(sd2, model_map=object(), clip_skip=skip).encode_text(["a"])
    assert seen == [2, 1, 1] and sd2.cond_stage_model.wrapped.layer_idx == 1

    monkeypatch.setitem(shared.opts.data, trainable.SDXL_CLIP_L_SKIP_OPT, True)
    flags = []
    sdxl = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=True, is_sd3=False,
                                 model=types.SimpleNamespace(diffusion_model=unet), conditioner=FakeConditioner(),
                                 first_stage_model=nn.Linear(1, 1), alphas_cumprod=torch.linspace(0.99, 0.01, 10))
    forward = FakeConditioner.forward
    monkeypatch.setattr(FakeConditioner, "forward",
                        lambda self, batch: flags.append(shared.opts.sdxl_clip_l_skip) or forward(self, batch))
    m = trainable.trainable_model(sdxl, model_map=object(), clip_skip=2)
    m.encode_text(["a"])
    assert flags == [False] and shared.opts.sdxl_clip_l_skip is True and m.clip_skip is None
    assert "Clip skip SDXL" in trainable.clip_skip_note(sdxl, "sdxl", None)


def test_a_run_at_clip_skip_2_samples_and_records_it(training_webui, sd_model, data):
    client = training_webui.start()
    during = []
    processing.process_callbacks.append(lambda p: during.append(shared.opts.CLIP_stop_at_last_layers))
    r = client.post("/lora-workshop/v1/train", json=request(
        data, name="cs2", clip_skip=2, sample_every_n_steps=4, sample_prompts=["zkx --s 1"]))
    st = training_webui.wait(r.json()["id"])
    assert st["state"] == "finished", st
    assert during == [2] and shared.opts.CLIP_stop_at_last_layers == 1  # samples see it; the user's is back
    assert any("captions are encoded at clip skip 2" in line for line in st["log"])
    meta = read_header(training_webui.lora_dir / "cs2.safetensors").metadata
    assert (meta["ss_clip_skip"], meta["modelspec.encoder_layer"]) == ("2", "2")


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
