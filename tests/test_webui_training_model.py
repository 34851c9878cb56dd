"""Training inside the stand-in WebUI: what the WebUI host does with the loaded model.

Captions through the WebUI's own text encoders (kohya's ``max_token_length`` through its chunks, SDXL's
conditioner, clip skip given back), kohya's ``v2`` against the loaded model, latents, and sample renders
with the WebUI's samplers.  The job runner, the API and the tab: test_webui_training.py.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from torch import nn

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import processing, shared  # noqa: E402
from modules.options import OptionInfo  # noqa: E402

from lib_lora.fileio import read_header  # noqa: E402
from lib_lora.hosts import webui_training as wt  # noqa: E402
from lib_lora.hosts import webui_trainable as trainable  # noqa: E402
from lib_lora.training import ui  # noqa: E402
from lib_lora.training.errors import RequestError  # noqa: E402
from lib_lora.training.request import build_request  # noqa: E402
from loras import same, snapshot  # noqa: E402

pytest.importorskip("fastapi")
from webui_training_support import request  # noqa: E402




# -- long captions: kohya's max_token_length through the WebUI's chunks; kohya's v2 ---------------------------


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


def test_sdxl_word_ids_come_from_each_text_embedders_own_tokenizer():
    """SDXL: one id list per text embedder (the size embedders have no tokenizer), in the text encoders' order;
    OpenCLIP's assertion about the old emphasis becomes a message naming the setting."""
    unet = nn.Conv2d(4, 4, 1)
    unet.in_channels = 4
    cond = FakeConditioner()
    cond.embedders[0].tokenize = lambda texts: [[11, 12] for _ in texts]
    cond.embedders[1].tokenize = lambda texts: [[21, 22] for _ in texts]
    sd = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=True, is_sd3=False,
                               model=types.SimpleNamespace(diffusion_model=unet), conditioner=cond,
                               first_stage_model=nn.Linear(1, 1), alphas_cumprod=torch.linspace(0.99, 0.01, 10))
    m = trainable.trainable_model(sd, model_map=object())
    assert m.tokenize_word("zkx") == [[11, 12], [21, 22]]

    def old_emphasis(texts):
        raise AssertionError("Old emphasis implementation not supported for Open Clip")
    cond.embedders[1].tokenize = old_emphasis
    with pytest.raises(ValueError, match="Use old emphasis implementation"):
        m.tokenize_word("zkx")


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


def test_pivotal_tuning_trains_through_the_webuis_embedders(training_webui, sd_model, data):
    """The word's ids from the WebUI embedder's own tokenizer, the vectors trained through its text encoder and
    bundled as the built-in Lora reads them; a word in no caption is a 400 naming the option, before queuing."""
    from lib_lora.bundled import parse_bundle, split_bundle
    from lib_lora.fileio import load_safetensors

    client = training_webui.start()
    r = client.post("/lora-workshop/v1/train/validate", json=request(data, pivotal_word="qwv"))
    assert r.status_code == 200 and [p["kind"] for p in r.json()["problems"]] == ["pivotal_word"]
    r = client.post("/lora-workshop/v1/train", json=request(data, pivotal_word="qwv"))
    assert r.status_code == 400 and "'qwv' is in none of the training images' captions" in r.text
    table = sd_model.cond_stage_model.wrapped.transformer.get_input_embeddings().weight.detach().clone()
    r = client.post("/lora-workshop/v1/train", json=request(data, "piv", pivotal_word="zkx", pivotal_lr=1e-2))
    assert r.status_code == 200, r.text
    st = training_webui.wait(r.json()["id"])
    assert st["state"] == "finished", st
    tensors, meta = load_safetensors(training_webui.lora_dir / st["output"])
    emb = parse_bundle("piv", split_bundle(tensors)[1])["zkx"]
    ids = sd_model.cond_stage_model.tokenize(["zkx"])[0]
    assert emb.vectors[""].shape == (len(ids), table.shape[1])
    # 4 AdamW steps of lr 1e-2: Adam moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) per step
    assert 0.5e-2 < (emb.vectors[""] - table[ids]).abs().max() <= 4 * 1e-2 * 0.1 / 0.001 ** 0.5
    assert meta["ss_pivotal_word"] == "zkx"
    # an embedding of that name from the embeddings folder would stand for the word at generation: refused
    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding
    sd_hijack.model_hijack.embedding_db.register_embedding(Embedding(torch.zeros(1, table.shape[1]), "ZKX"), sd_model)
    r = client.post("/lora-workshop/v1/train", json=request(data, "piv2", pivotal_word="zkx"))
    assert r.status_code == 400 and "the embedding 'ZKX' from the embeddings folder" in r.text, r.text
    assert torch.equal(sd_model.cond_stage_model.wrapped.transformer.get_input_embeddings().weight, table)
    assert not sd_model.cond_stage_model.wrapped.transformer.get_input_embeddings()._forward_hooks
