"""End-to-end: the real AUTOMATIC1111 WebUI with LoRA Workshop linked in (skipped unless WEBUI_DIR is set).

Run it against a WebUI checkout (v1.10.x) whose environment is already prepared (its venv
installed, ``repositories/`` cloned — i.e. it has been started once):

    WEBUI_DIR=/path/to/stable-diffusion-webui \\
    [WEBUI_PYTHON=/path/to/stable-diffusion-webui/venv/bin/python] \\
    [WEBUI_E2E_CKPT=/path/to/any-sd1.safetensors WEBUI_E2E_LORA=/path/to/an-sd1-lora.safetensors] \\
    [WEBUI_E2E_TIMEOUT=900] [WEBUI_E2E_DISABLE_BUILTIN_LORA=1] \\
    [WEBUI_E2E_LBW_DIR=/path/to/sd-webui-lora-block-weight] \\
    .venv/bin/python -m pytest tests/test_e2e_webui.py -v

What it does: makes a throw-away ``--data-dir`` with ``extensions/lora-workshop`` symlinked
to this repository, a checkpoint and a LoRA, then starts

    python launch.py --skip-prepare-environment --skip-install --no-download-sd-model
        --skip-torch-cuda-test --use-cpu all --no-half --api --api-auth e2e:e2e-pass
        --data-dir <tmp> --ckpt <ckpt> --port <free port> --skip-version-check

and talks to it over HTTP (the launcher is tests/webui_server.py).  Without WEBUI_E2E_CKPT a tiny SD1 checkpoint is generated
(tiny UNet and VAE with a .yaml next to it; the text encoder has CLIP ViT-L/14's shape with
random weights), plus a LoRA for it.  The WebUI still needs the ViT-L/14 *tokenizer and
config* from the Hugging Face cache, as for any SD1 model: when the cache has no
openai/clip-vit-large-patch14 snapshot, one is built offline (tests/hf_clip_l.py) in a temp
HF_HOME and the WebUI runs with HF_HUB_OFFLINE=1.  WEBUI_E2E_DISABLE_BUILTIN_LORA=1 disables the
WebUI's built-in Lora extension (``"disabled_extensions": ["Lora"]`` in the data dir's
config.json, the WebUI's own mechanism).  With WEBUI_E2E_CKPT you must also give a matching
WEBUI_E2E_LORA.  The server log is kept in the temp folder and its tail is printed when
something fails.  WEBUI_E2E_LBW_DIR (a LoRA Block Weight checkout) starts a second WebUI with the
built-in Lora and LBW but not us, and compares lbw= images with its (tests/e2e_lbw.py).  The tools'
tests (tests/e2e_tools.py) run on the same server: the Tools section as gradio builds it, jobs through
the API and the Run button, their outputs listed and used.  WEBUI_E2E_SD3=1 adds tests/e2e_sd3.py: a tiny SD3
checkpoint (about 1.8 GB, written and deleted) on a WebUI of its own, with kohya- and diffusers-spelled SD3 LoRAs.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from e2e_variants import DORA, KINDS
from webui_server import (LORA_NAME, GradioUI, Server, StartError, data_dir, pixels, running, tiny_checkpoint,
                          webui_python)

WEBUI_DIR = os.environ.get("WEBUI_DIR")
BUILTIN_OFF = os.environ.get("WEBUI_E2E_DISABLE_BUILTIN_LORA") == "1"  # run without the WebUI's own Lora extension

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason="set WEBUI_DIR to a prepared stable-diffusion-webui checkout")

def test_captions_reach_the_webui_parser_as_literal_text():
    """The WebUI's own prompt parser reads an escaped caption back as the caption, at weight 1."""
    from lib_lora.params import literal_caption

    captions = ["hatsune miku (vocaloid), [sketch], a\\b", "(red:1.3) square, ((blue))", "plain, tags"]
    code = ("import json, sys; from modules.prompt_parser import parse_prompt_attention as p; "
            "print(json.dumps([p(t) for t in json.loads(sys.argv[1])]))")
    r = subprocess.run([webui_python(Path(WEBUI_DIR)), "-c", code, json.dumps([literal_caption(c) for c in captions])],
                       cwd=WEBUI_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == [[[c, 1.0]] for c in captions]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    webui = Path(WEBUI_DIR)
    if not (webui / "launch.py").is_file() or not (webui / "repositories").is_dir():
        pytest.skip(f"{webui} is not a prepared WebUI checkout (launch.py and repositories/ needed)")
    data = tmp_path_factory.mktemp("webui-data")
    ckpt_dir, lora_dir = data_dir(data, builtin_off=BUILTIN_OFF)
    if os.environ.get("WEBUI_E2E_CKPT"):
        if not os.environ.get("WEBUI_E2E_LORA"):
            pytest.skip("WEBUI_E2E_CKPT needs a matching WEBUI_E2E_LORA")
        ckpt = Path(os.environ["WEBUI_E2E_CKPT"])
        lora = Path(shutil.copy(os.environ["WEBUI_E2E_LORA"], lora_dir / f"{LORA_NAME}.safetensors"))
    else:
        pytest.importorskip("ldm")
        ckpt, lora = tiny_checkpoint(ckpt_dir, lora_dir)
    try:
        with running(webui, data, ckpt, lora, timeout=float(os.environ.get("WEBUI_E2E_TIMEOUT", "900")),
                     ready="/lora-workshop/v1/loras") as srv:
            yield srv
    except StartError as e:
        pytest.fail(str(e))


def test_routes_need_api_auth_and_list_the_lora(server):
    assert server.request("GET", "/lora-workshop/v1/loras", auth=None)[0] == 401
    assert server.request("GET", "/lora-workshop/v1/loras", auth=("e2e", "wrong"))[0] == 401
    status, loras = server.request("GET", "/lora-workshop/v1/loras")
    assert status == 200
    assert [x["path"] for x in loras if x["name"] == LORA_NAME] == [f"{LORA_NAME}.safetensors"]
    status, detail = server.request("GET", f"/lora-workshop/v1/loras/{LORA_NAME}")
    assert status == 200 and len(detail["hashes"]["shorthash"]) == 12
    assert server.request("GET", "/lora-workshop/v1/loras/..%2F..%2Fconfig")[0] == 404
    assert server.request("POST", "/lora-workshop/v1/refresh")[0] == 200


def test_ui_loads_with_one_workshop_tab_and_one_lora_page(server):
    _assert_ui_complete(server)


def _assert_ui_complete(server: Server) -> None:
    """The page loads with our script and stylesheet, one "LoRA Workshop" tab and one Lora page per tab."""
    from lib_lora.training.ui import TAB_ID, TAB_TITLE

    status, page = server.request("GET", "/", auth=None)
    assert status == 200 and "gradio" in page
    # our script and stylesheet are linked into the page, from the extension folder, and served
    ours = re.findall(r'(?:src|href)="(file=[^"?]*/lora-workshop/(?:javascript/lora_workshop\.js|style\.css)\?[^"]*)"',
                      page)
    assert len(ours) == 2, ours
    for url in ours:
        assert server.request("GET", "/" + url, auth=None)[0] == 200, url
    ui = GradioUI(server)
    comps = ui.by_id

    def ids(elem_id: str) -> list[dict]:
        return [c for c in comps.values() if c.get("props", {}).get("elem_id") == elem_id]

    def children(node: dict, elem_id: str) -> list[dict] | None:
        """The components directly inside the one with ``elem_id``, from the layout tree."""
        if comps.get(node["id"], {}).get("props", {}).get("elem_id") == elem_id:  # the root is no component
            return [comps[c["id"]] for c in node.get("children", [])]
        return next((r for c in node.get("children", []) if (r := children(c, elem_id)) is not None), None)

    # the main tab strip (#tabs); Settings has a "LoRA Workshop" section tab of its own
    main_tabs = [c for c in children(ui.config["layout"], "tabs") or [] if c["type"] == "tabitem"]
    ours = [c for c in main_tabs if c["props"].get("label") == TAB_TITLE]
    assert len(ours) == 1 and ours[0]["props"].get("elem_id") == f"tab_{TAB_ID}", main_tabs
    for tabname in ("txt2img", "img2img"):
        pages = ids(f"{tabname}_lora")
        assert len(pages) == 1 and pages[0]["props"].get("label") == "Lora", pages
    assert len(ids("lora_workshop_tools")) == 1   # the tab's Tools section
    # the built-in's own setting shows whether WEBUI_E2E_DISABLE_BUILTIN_LORA took effect
    assert bool(ids("setting_sd_lora")) == (not BUILTIN_OFF)


def test_ui_cards_notes_editor_and_training_tab(server):
    """What the browser runs: the Lora page's cards, the notes editor, the training tab's status."""
    ui = GradioUI(server)
    cards = ui.elem("txt2img_lora_cards_html")
    load = ui.fn_index("load", output="txt2img_lora_cards_html")
    page = ui.outputs(load, ui.call(load))[cards]
    assert f'data-name="{LORA_NAME}"' in page and 'data-sort-lwfamily="SD1"' in page, page[:2000]

    # the notes editor: open, save, open again; the values land in <lora>.json beside the file
    part = "txt2img_lora_edit_user_metadata"
    edit = ui.fn_index("click", target=f"{part}_button")
    opened = ui.call(edit, LORA_NAME)
    assert len(opened) == 12 and LORA_NAME in opened[0] and "Family:" in opened[2], opened
    assert opened[5] == "SD1"  # the "Stable Diffusion version" dropdown; then the training tags, ...
    assert opened[6]["__type__"] == "update" and opened[10]["__type__"] == "update"  # ... their row and prompt
    [save] = [i for i, d in enumerate(ui.config["dependencies"]) if d["trigger"] == "click"
              and d["inputs"][:1] == [ui.elem(f"{part}_name")] and len(d["inputs"]) == 7]
    ui.call(save, LORA_NAME, "a description", "SD1", "e2e style", 0.7, "blurry", "my notes")
    notes = json.loads((server.lora.parent / f"{LORA_NAME}.json").read_text(encoding="utf-8"))
    assert notes["activation text"] == "e2e style" and notes["preferred weight"] == 0.7 and notes["notes"] == "my notes"
    assert notes["sd version"] == "SD1"
    again = ui.call(edit, LORA_NAME)
    assert again[1:6] == ["a description", opened[2], opened[3], "my notes", "SD1"]
    assert again[7:10] == ["e2e style", 0.7, "blurry"]
    # a click on a training tag adds it to the activation text, a second one takes it out
    activation = ui.config["dependencies"][edit]["outputs"][7]
    [pick] = [i for i, d in enumerate(ui.config["dependencies"]) if d["trigger"] == "select"
              and d["inputs"] == [activation] and d["outputs"] == [activation]]
    assert ui.call(pick, "e2e style", event_data={"index": 0, "value": ["cat", "2"]}) == ["e2e style, cat"]
    assert ui.call(pick, "e2e style, cat", event_data={"index": 0, "value": ["cat", "2"]}) == ["e2e style"]
    status, card = server.request(
        "GET", f"/sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name={LORA_NAME}", auth=None)
    assert status == 200 and f'"<lora:{LORA_NAME}:0.7> e2e style"' in html.unescape(card["html"]), card
    # back to no notes (deleting the file instead would confuse the WebUI's cached file listing)
    ui.call(save, LORA_NAME, "", "Unknown", "", 0, "", "")

    # the training tab's status poll (no queue: it runs every 2 s while the tab is shown)
    server.txt2img("a photo")  # the checkpoint loads in the background after start: wait for it
    poll = ui.fn_index("click", target="lora_workshop_poll")
    status_html = ui.call(poll, None)[0]
    assert "Trains on the loaded SD1 model" in status_html, status_html


def test_sdapi_loras_keeps_the_builtin_shape(server):
    status, items = server.request("GET", "/sdapi/v1/loras")
    assert status == 200
    item = next(x for x in items if x["name"] == LORA_NAME)
    assert set(item) == {"name", "alias", "path", "metadata"}


def test_txt2img_applies_lora_writes_hashes_and_restores(server):
    from lib_lora.hashes import addnet_hash_safetensors

    plain = server.txt2img("a photo")
    with_lora = server.txt2img(f"a photo <lora:{LORA_NAME}:1>")
    again = server.txt2img("a photo")
    assert with_lora["info"]["extra_generation_params"]["Lora hashes"] == \
        f"{LORA_NAME}: {addnet_hash_safetensors(server.lora)[:12]}"
    assert "Lora hashes" not in plain["info"]["extra_generation_params"]
    assert pixels(with_lora["image"]) != pixels(plain["image"]), "the LoRA changed nothing"
    assert again["image"] == plain["image"], "weights were not restored exactly"


def test_missing_lora_is_reported_not_fatal(server):
    server.txt2img("a photo <lora:does_not_exist:1>")
    deadline = time.time() + 10
    while "Lora not found: does_not_exist" not in server.log_tail(200_000) and time.time() < deadline:
        time.sleep(0.5)
    assert "Lora not found: does_not_exist" in server.log_tail(200_000)


def test_extra_networks_card_comes_from_our_page(server):
    status, res = server.request(
        "GET", f"/sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name={LORA_NAME}", auth=None)
    assert status == 200
    assert 'data-sort-lwfamily="SD1"' in res["html"]


def test_training_job_on_the_loaded_model(server, tmp_path):
    """Train through the API on the loaded checkpoint; the file appears as a card; generation is unchanged."""
    from PIL import Image

    # API requests may read datasets only below the WebUI's data folder (or folders listed in the settings)
    data = server.log.parent / "datasets" / "e2e" / "2_e2etrig"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 30 * i, 40)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("e2etrig, red square", encoding="utf-8")
    before = server.txt2img("a photo")
    body = {"output_name": "e2e_trained", "dataset": {"train_dir": str(data.parent), "resolution": 64,
                                                      "min_bucket_reso": 64, "max_bucket_reso": 128},
            "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 3,
            "save_precision": "fp32",
            # one sample at step 3: rendered by the WebUI's own processing with the training LoRA attached
            "sample_every_n_steps": 3, "sample_prompts": ["e2etrig, red square --s 2 --d 5"]}
    assert server.request("POST", "/lora-workshop/v1/train", {**body, "output_name": "../x"})[0] == 400
    outside = {**body, "dataset": {**body["dataset"], "train_dir": str(tmp_path)}}
    assert server.request("POST", "/lora-workshop/v1/train/validate", outside)[0] == 400
    status, job = server.request("POST", "/lora-workshop/v1/train", body)
    assert status == 200, job
    assert server.request("POST", "/lora-workshop/v1/train", {**body, "output_name": "other"})[0] == 409
    deadline = time.time() + 600
    while True:
        status, st = server.request("GET", f"/lora-workshop/v1/train/{job['id']}")
        if st["state"] in ("finished", "stopped", "failed") or time.time() > deadline:
            break
        time.sleep(2)
    assert st["state"] == "finished", f"{st.get('error')}\n{server.log_tail()}"
    assert st["model_untouched"] is True
    assert st["step"] == st["total"] == 3 and [x["step"] for x in st["samples"]] == [3], st["log"]
    assert server.request("GET", st["samples"][0]["url"])[0] == 200
    names = [x["name"] for x in server.request("GET", "/lora-workshop/v1/loras")[1]]
    assert "e2e_trained" in names
    assert server.txt2img("a photo")["image"] == before["image"], "training changed the loaded model"
    assert pixels(server.txt2img("a photo <lora:e2e_trained:1>")["image"]) != pixels(before["image"])


def test_training_at_clip_skip_2_gives_the_users_setting_back(server):
    """kohya's clip_skip=2 in the real WebUI: captions and the sample are encoded at clip skip 2 through the
    WebUI's own embedder, the file records it, and the user's Clip skip setting is the same afterwards."""
    from PIL import Image

    from lib_lora.fileio import read_header

    data = server.log.parent / "datasets" / "e2e_cs2" / "1_cstrig"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 200, 30 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("cstrig, green square", encoding="utf-8")
    status, opts = server.request("GET", "/sdapi/v1/options")
    assert status == 200, opts
    before = opts["CLIP_stop_at_last_layers"]
    body = {"output_name": "e2e_cs2", "dataset": {"train_dir": str(data.parent), "resolution": 64,
                                                  "enable_buckets": False},
            "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 2, "clip_skip": 2,
            "save_precision": "fp32", "sample_every_n_steps": 2, "sample_prompts": ["cstrig --s 2 --d 5"]}
    status, job = server.request("POST", "/lora-workshop/v1/train", body)
    assert status == 200, job
    st = _wait_job(server, job["id"])
    assert st["state"] == "finished", f"{st.get('error')}\n{server.log_tail()}"
    assert any("captions are encoded at clip skip 2" in line for line in st["log"]), st["log"]
    assert [x["step"] for x in st["samples"]] == [2], st["log"]
    assert server.request("GET", "/sdapi/v1/options")[1]["CLIP_stop_at_last_layers"] == before
    meta = read_header(server.lora.parent / "e2e_cs2.safetensors").metadata
    assert (meta["ss_clip_skip"], meta["modelspec.encoder_layer"]) == ("2", "2")

def test_training_with_max_token_length_through_the_webuis_chunking(server):
    """kohya's max_token_length=150 in the real WebUI: captions that agree in their first two chunks and differ
    after them train bit-identical files (the WebUI's own embedder cut them at two chunks), while without the
    limit the same two captions train different files; the file records the limit."""
    import torch
    from PIL import Image

    from lib_lora.fileio import load_file, read_header

    prefix = "mtltrig, " + ", ".join(f"tag{i}" for i in range(60))  # ~180 tokens: over two 75-token chunks
    files = {}
    for name, tail, limit in (("e2e_mtl_a", "red", 150), ("e2e_mtl_b", "blue", 150), ("e2e_mtl_c", "blue", None)):
        data = server.log.parent / "datasets" / name / "1_mtltrig"
        data.mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "0.png")
        (data / "0.txt").write_text(f"{prefix}, {tail} square, {tail} background", encoding="utf-8")
        body = {"output_name": name, "dataset": {"train_dir": str(data.parent), "resolution": 64,
                                                 "enable_buckets": False},
                "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 2, "seed": 7,
                "max_token_length": limit, "save_precision": "fp32", "learning_rate": 1e-2}
        status, job = server.request("POST", "/lora-workshop/v1/train", body)
        assert status == 200, job
        st = _wait_job(server, job["id"])
        assert st["state"] == "finished", f"{st.get('error')}\n{server.log_tail()}"
        files[name] = load_file(server.lora.parent / f"{name}.safetensors")[0]
    a, b, c = files["e2e_mtl_a"], files["e2e_mtl_b"], files["e2e_mtl_c"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], c[k]) for k in b)  # the tail does reach training when nothing cuts it
    assert read_header(server.lora.parent / "e2e_mtl_a.safetensors").metadata["ss_max_token_length"] == "150"


def test_pivotal_tuning_trains_through_the_webuis_hijacked_embeddings(server):
    """pivotal_word in the real WebUI: the word's ids from its own embedder, its vectors trained through the
    hijacked token table (EmbeddingsWithFixes), every hook gone after (the job's fingerprint), and the file's
    bundled embedding used by a generation that names the word (TI hashes)."""
    import torch
    from open_clip.tokenizer import _tokenizer
    from PIL import Image
    from safetensors import safe_open

    from lib_lora.fileio import load_file, read_header

    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("compares with the tiny checkpoint's token table")
    data = server.log.parent / "datasets" / "e2e_piv" / "1_pvtrig"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 30 * i, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("pvtrig, blue square", encoding="utf-8")
    body = {"output_name": "e2e_pivotal", "dataset": {"train_dir": str(data.parent), "resolution": 64,
                                                      "enable_buckets": False},
            "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 3,
            "save_precision": "fp32", "pivotal_word": "pvtrig", "pivotal_lr": 1e-2,
            "sample_every_n_steps": 3, "sample_prompts": ["pvtrig, blue square --s 2 --d 5"]}
    status, problems = server.request("POST", "/lora-workshop/v1/train/validate", {**body, "pivotal_word": "nope"})
    assert status == 200 and [p["kind"] for p in problems["problems"]] == ["pivotal_word"], problems
    status, job = server.request("POST", "/lora-workshop/v1/train", body)
    assert status == 200, job
    st = _wait_job(server, job["id"])
    assert st["state"] == "finished", f"{st.get('error')}\n{server.log_tail()}"
    assert st["model_untouched"] is True and [x["step"] for x in st["samples"]] == [3], st["log"]
    path = server.lora.parent / "e2e_pivotal.safetensors"
    vec = load_file(path)[0]["bundle_emb.pvtrig.string_to_param.*"]
    ids = _tokenizer.encode("pvtrig")
    with safe_open(str(server.ckpt), "pt") as f:
        table = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").float()
    assert vec.shape == (len(ids), table.shape[1])
    # three AdamW steps of lr 1e-2: Adam moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) per step
    assert 0.5e-2 < (vec - table[ids]).abs().max() <= 3 * 1e-2 * 0.1 / 0.001 ** 0.5
    assert read_header(path).metadata["ss_pivotal_word"] == "pvtrig"
    assert server.request("POST", "/lora-workshop/v1/refresh")[0] == 200
    made = server.txt2img("a photo of pvtrig <lora:e2e_pivotal:1>")
    assert made["info"]["extra_generation_params"].get("TI hashes") == "pvtrig: e2e_pivotal", made["info"]


def _job_status(server: Server, job_id: str) -> dict:
    status, st = server.request("GET", f"/lora-workshop/v1/train/{job_id}")
    assert status == 200, st
    return st


def _wait_job(server: Server, job_id: str, until=lambda st: st["state"] in ("finished", "stopped", "failed"),
              timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while True:
        st = _job_status(server, job_id)
        if until(st) or time.time() > deadline:
            return st
        time.sleep(0.2)


def test_generate_while_training_with_the_live_lora(server):
    """txt2img runs between two training steps, with and without <lora:NAME@live>; the job goes on
    and its file is the one a run holding the lock throughout writes."""
    from lib_lora.fileio import load_file

    data = server.log.parent / "datasets" / "e2e-live" / "2_livetrig"
    data.mkdir(parents=True)
    for i in range(2):
        from PIL import Image
        Image.new("RGB", (64, 64), (40, 200, 30 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("livetrig, green square", encoding="utf-8")
    body = {"dataset": {"train_dir": str(data.parent), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
            "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 400,
            "learning_rate": 5e-3, "lr_scheduler": "constant", "save_precision": "fp32"}
    assert server.request("POST", "/sdapi/v1/options", {"lora_workshop_train_priority": "Generation first",
                                                        "lora_workshop_train_yield_seconds": 0})[0] == 200
    plain_before = server.txt2img("a photo")
    status, job = server.request("POST", "/lora-workshop/v1/train", {**body, "output_name": "e2e_live"})
    assert status == 200, job
    st = _wait_job(server, job["id"], until=lambda st: st["step"] >= 2 or st["state"] not in ("queued", "validating",
                                                                                             "running"))
    assert st["state"] == "running", f"{st}\n{server.log_tail()}"
    try:
        plain = server.txt2img("a photo")
        st = _job_status(server, job["id"])
        assert st["state"] == "running" and st["pauses"] >= 1, st   # answered between two steps, not at the end
        assert plain["image"] == plain_before["image"], "the model was not as loaded for the generation"
        step_before = st["step"]
        live = server.txt2img("a photo <lora:e2e_live@live:1>")
        info = live["info"]["extra_generation_params"]
        match = re.fullmatch(rf"e2e_live@live: job {job['id']} step (\d+) hash ([0-9a-f]{{12}})",
                             info["LoRA Workshop live"])
        assert match, info
        assert step_before <= int(match.group(1)) <= step_before + 2, (step_before, info)  # within a couple of steps
        assert info["Lora hashes"] == f"e2e_live@live: {match.group(2)}"
        assert pixels(live["image"]) != pixels(plain["image"]), "the live LoRA changed nothing"
        status, kept = server.request("POST", f"/lora-workshop/v1/train/{job['id']}/keep")
        assert status == 200 and kept["file"].startswith("e2e_live-step"), kept
    finally:
        server.request("POST", f"/lora-workshop/v1/train/{job['id']}/stop", {"save": True})
    st = _wait_job(server, job["id"])
    assert st["state"] == "stopped" and st["output"] == "e2e_live.safetensors" and st["model_untouched"] is True, st
    assert st["time_paused"] > 0 and any("paused" in line for line in st["log"])
    assert server.txt2img("a photo")["image"] == plain_before["image"]

    # the same run, the lock held throughout, to the step the first one stopped at
    assert server.request("POST", "/sdapi/v1/options", {"lora_workshop_train_priority": "Training only"})[0] == 200
    try:
        status, ref = server.request("POST", "/lora-workshop/v1/train",
                                     {**body, "output_name": "e2e_live_ref", "max_train_steps": st["step"]})
        assert status == 200, ref
        ref_st = _wait_job(server, ref["id"])
    finally:
        server.request("POST", "/sdapi/v1/options", {"lora_workshop_train_priority": "Generation first",
                                                     "lora_workshop_train_yield_seconds": 1})
    assert ref_st["state"] == "finished" and ref_st["pauses"] == 0, ref_st
    folder = server.lora.parent
    a, b = load_file(folder / "e2e_live.safetensors")[0], load_file(folder / "e2e_live_ref.safetensors")[0]
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a), \
        "the file trained with generations in between differs from the uninterrupted run's"
    kept_step = int(kept["file"].split("-step")[1].split(".")[0])
    assert kept_step <= st["step"] and (folder / kept["file"]).is_file()


def test_reload_ui_keeps_one_tab_one_page_and_loras_working(server):
    """Settings > Reload UI: scripts re-run and a new app is built; nothing doubles, <lora:> still applies."""
    plain, with_lora = server.txt2img("a photo"), server.txt2img(f"a photo <lora:{LORA_NAME}:1>")
    ui = GradioUI(server)
    starts = server.log.read_text(errors="replace").count("Startup time:")
    ui.call(ui.fn_index("click", target="settings_restart_gradio"))
    deadline = time.time() + 300
    while server.log.read_text(errors="replace").count("Startup time:") == starts:
        assert server.proc.poll() is None and time.time() < deadline, server.log_tail()
        time.sleep(1)
    assert "Traceback" not in server.log.read_text(errors="replace").split("Restarting UI...")[-1], server.log_tail()
    _assert_ui_complete(server)
    assert server.request("GET", "/lora-workshop/v1/loras")[0] == 200
    assert server.request("GET", "/lora-workshop/v1/loras", auth=None)[0] == 401
    page = GradioUI(server)
    load = page.fn_index("load", output="txt2img_lora_cards_html")
    assert 'data-sort-lwfamily="SD1"' in page.outputs(load, page.call(load))[page.elem("txt2img_lora_cards_html")]
    assert server.txt2img(f"a photo <lora:{LORA_NAME}:1>")["image"] == with_lora["image"]
    assert server.txt2img("a photo")["image"] == plain["image"]


# -- one file of each kind, in the real WebUI ------------------------------------------------------


@pytest.fixture(scope="module")
def variants(server):
    """Every kind of e2e_variants.KINDS in the server's LoRA folder, listed; and the no-LoRA base image."""
    pytest.importorskip("lycoris")
    from e2e_variants import write_variants

    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("the variant files are made for the tiny checkpoint")
    paths = write_variants(server.lora.parent)
    status, counts = server.request("POST", "/lora-workshop/v1/refresh")
    assert status == 200, counts
    listed = {x["name"]: x["path"] for x in server.request("GET", "/lora-workshop/v1/loras")[1]}
    assert {n: listed.get(n) for n in paths} == {n: p.name for n, p in paths.items()}
    return {"paths": paths, "base": server.txt2img("a photo")["image"]}


def _assert_applied_cleanly(server: Server, name: str, res: dict, log: str) -> None:
    status, detail = server.request("GET", f"/lora-workshop/v1/loras/{name}")
    assert status == 200, detail
    info = res["info"]
    assert info["extra_generation_params"].get("Lora hashes") == f"{name}: {detail['hashes']['shorthash']}", info
    assert f'Lora hashes: "{name}: ' in info["infotexts"][0]
    # every activation message (unmatched layers, unknown keys, a failed apply) is printed as "[LoRA Workshop] ..."
    ours = [line for line in log.splitlines() if "[LoRA Workshop]" in line or "Traceback" in line]
    assert not ours, "\n".join(ours)
    for text in (*info["infotexts"], json.dumps(info["extra_generation_params"])):
        assert "counterpart" not in text and "did not match" not in text and "skipped" not in text, text


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_of_file_applies_and_restores(server, variants, name):
    with_lora, log = server.txt2img_logged(f"a photo <lora:{name}:1>")
    again = server.txt2img("a photo")
    _assert_applied_cleanly(server, name, with_lora, log)
    assert pixels(with_lora["image"]) != pixels(variants["base"]), f"{name} changed nothing"
    assert again["image"] == variants["base"], f"{name}: weights were not restored exactly"


def test_dora_follows_the_builtin_dora_setting(server, variants):
    """lora_workshop_builtin_dora switches to the built-in's DoRA formula: another image, restored after."""
    key = "lora_workshop_builtin_dora"
    assert server.request("GET", "/sdapi/v1/options")[1][key] is False
    lycoris_mode = server.txt2img(f"a photo <lora:{DORA}:1>")["image"]
    assert server.request("POST", "/sdapi/v1/options", {key: True})[0] == 200
    try:
        assert server.request("GET", "/sdapi/v1/options")[1][key] is True
        webui_mode, log = server.txt2img_logged(f"a photo <lora:{DORA}:1>")
    finally:
        assert server.request("POST", "/sdapi/v1/options", {key: False})[0] == 200
    _assert_applied_cleanly(server, DORA, webui_mode, log)
    assert pixels(webui_mode["image"]) not in (pixels(lycoris_mode), pixels(variants["base"]))
    assert server.txt2img(f"a photo <lora:{DORA}:1>")["image"] == lycoris_mode
    assert server.txt2img("a photo")["image"] == variants["base"]


# -- the tools (tests/e2e_tools.py), on this module's server -----------------------------------------

from e2e_tools import (  # noqa: E402,F401  (collected in this order)
    test_gradio_standin_takes_what_the_webuis_gradio_takes, test_tools_section_is_built_by_the_webuis_gradio,
    test_resize_job_output_is_a_lora_the_webui_applies, test_bake_writes_a_checkpoint_the_webui_lists,
    test_tool_refusals_over_http, test_run_button_starts_a_job_through_gradio)


# -- lbw= against LoRA Block Weight itself --------------------------------------------------------

LBW_DIR = os.environ.get("WEBUI_E2E_LBW_DIR")  # a checkout of hako-mikan/sd-webui-lora-block-weight
# LBW scales lora_up by the block weight before the product and the built-in merges a step-ranged
# LoRA into the weight; we fold the block weight into the product's scalar and add a step-ranged
# LoRA's output by a hook. Either rounds a weight or an output one float32 step differently, and now
# and then an 8-bit value near a rounding boundary lands one level apart: at most this many of the
# 64*64*3 values may differ, by one level. Every image below differs from every other in far more.
LBW_MAX_DIFFERING = 12


@pytest.fixture(scope="module")
def lbw_reference(server, tmp_path_factory):
    """A second WebUI on the same checkpoint with the built-in Lora and LBW, without us; both
    servers hold the LoRAs of e2e_lbw.py, and we read LBW's presets file while it runs."""
    if not LBW_DIR:
        pytest.skip("set WEBUI_E2E_LBW_DIR to a sd-webui-lora-block-weight checkout to compare lbw= with LBW")
    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("the block-weight LoRAs are made for the tiny checkpoint")
    from e2e_lbw import write_lbw_loras

    lbw = Path(LBW_DIR)
    assert (lbw / "scripts" / "lora_block_weight.py").is_file(), f"{lbw} is not LoRA Block Weight"
    data = tmp_path_factory.mktemp("webui-lbw-reference")
    _, lora_dir = data_dir(data, extension=False, others={"sd-webui-lora-block-weight": lbw})
    write_lbw_loras(lora_dir)
    write_lbw_loras(server.lora.parent)
    assert server.request("POST", "/lora-workshop/v1/refresh")[0] == 200
    try:
        with running(Path(WEBUI_DIR), data, server.ckpt,
                     timeout=float(os.environ.get("WEBUI_E2E_TIMEOUT", "900"))) as ref:
            presets = lbw / "scripts" / "lbwpresets.txt"  # LBW writes it on start if it has none
            key = "lora_workshop_lbw_presets"
            assert server.request("POST", "/sdapi/v1/options", {key: str(presets)})[0] == 200
            try:
                yield ref
            finally:
                assert server.request("POST", "/sdapi/v1/options", {key: ""})[0] == 200
    except StartError as e:
        pytest.fail(str(e))


def test_lbw_gives_the_pixels_of_builtin_plus_lbw(server, lbw_reference):
    """Presets, 17/26-value vectors, fractions, negative and X values, two LoRAs with other
    vectors, start=/stop=: each image is the reference's, up to LBW_MAX_DIFFERING one-level values."""
    import numpy as np
    from e2e_lbw import PROMPTS, blocks_touched

    # the layers changed span the blocks the tiny UNet has, and some outside every block
    assert blocks_touched() == ["BASE", *(f"IN{i:02d}" for i in range(8)), "M00",
                                *(f"OUT{i:02d}" for i in range(8)), "outside"]

    def rgb(image_b64: str):
        return np.frombuffer(pixels(image_b64), dtype=np.uint8).astype(np.int16)

    ours, report, bad = {}, [], []
    for label, prompt, overrides in PROMPTS:
        mine, ref = server.txt2img(prompt, **overrides), lbw_reference.txt2img(prompt, **overrides)
        a, b = rgb(mine["image"]), rgb(ref["image"])
        diff = np.abs(a - b)
        report.append(f"{label}: {int((diff > 0).sum())} of {diff.size} values differ, by at most {int(diff.max())}")
        if diff.max() > 1 or (diff > 0).sum() > LBW_MAX_DIFFERING:
            bad.append(report[-1])
        assert mine["info"]["extra_generation_params"].get("Lora hashes") == \
            ref["info"]["extra_generation_params"].get("Lora hashes"), label
        ours[label] = a
    print("\n".join(report))
    assert not bad, "\n".join(report) + "\n" + server.log_tail(2000) + "\n" + lbw_reference.log_tail(2000)
    # the tolerance is far below what a block weight changes: no two of the images come close
    images = [*ours.items(), *((f"no LoRA, {steps} steps", rgb(server.txt2img("a photo", steps=steps)["image"]))
                               for steps in (2, 6))]
    for i, (la, a) in enumerate(images):
        for lb, b in images[i + 1:]:
            assert (a != b).sum() > 50 * LBW_MAX_DIFFERING, f"{la} and {lb} are nearly the same image"


# -- SD3 (tests/e2e_sd3.py): a tiny SD3 checkpoint on a WebUI of its own, with WEBUI_E2E_SD3=1 ---------

from e2e_sd3 import (  # noqa: E402,F401
    sd3_server, test_sd3_checkpoint_loads_as_sd3, test_sd3_lora_applies_writes_hashes_and_restores)


# -- textual-inversion embeddings bundled in a LoRA file -------------------------------------------------


def test_bundled_embedding_changes_the_prompt_and_is_gone_after(server):
    """A LoRA with ``bundle_emb.NAME.string_to_param.*`` against the same LoRA without it: the prompt that says
    NAME gives another image (the embedding's vectors replace the word), ``TI hashes`` names the LoRA, nothing is
    printed, and the next generation without the LoRA is the one from before."""
    import torch
    from safetensors import safe_open

    from lib_lora.fileio import load_file, save_safetensors

    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("the bundled embedding is made for the tiny checkpoint's text encoder")
    with safe_open(str(server.ckpt), "pt") as f:
        width = f.get_slice("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").get_shape()[1]
    sd, meta = load_file(server.lora)
    folder = server.lora.parent
    save_safetensors(sd, folder / "e2e_bundle_plain.safetensors", metadata=meta)
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(5))
    save_safetensors({**sd, "bundle_emb.e2estar.string_to_param.*": vec}, folder / "e2e_bundle.safetensors",
                     metadata=meta)
    assert server.request("POST", "/lora-workshop/v1/refresh")[0] == 200

    prompt = "a photo of e2estar"
    before = server.txt2img(prompt)
    plain, plain_log = server.txt2img_logged(f"{prompt} <lora:e2e_bundle_plain:1>")
    bundled, log = server.txt2img_logged(f"{prompt} <lora:e2e_bundle:1>")
    after = server.txt2img(prompt)
    for text in (plain_log, log):
        ours = [line for line in text.splitlines() if "[LoRA Workshop]" in line or "Traceback" in line
                or "Skip bundle embedding" in line]
        assert not ours, "\n".join(ours)
    params = bundled["info"]["extra_generation_params"]
    assert params.get("TI hashes") == "e2estar: e2e_bundle", params
    assert "TI hashes" not in plain["info"]["extra_generation_params"]
    assert pixels(bundled["image"]) != pixels(plain["image"]), "the bundled embedding changed nothing"
    assert after["image"] == before["image"], "the bundled embedding stayed registered"


def test_a_bundled_embedding_of_another_width_is_listed_as_skipped(server):
    """A bundled embedding whose width does not fit the model: the image is made, and ``/sdapi/v1/embeddings``
    lists it under ``skipped`` (with its own width and vector count), as the built-in lists it."""
    import torch
    from safetensors import safe_open

    from lib_lora.fileio import load_file, save_safetensors

    if os.environ.get("WEBUI_E2E_CKPT"):
        pytest.skip("the bundled embedding is made for the tiny checkpoint's text encoder")
    with safe_open(str(server.ckpt), "pt") as f:
        width = f.get_slice("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").get_shape()[1]
    sd, meta = load_file(server.lora)
    save_safetensors({**sd, "bundle_emb.e2ewide.string_to_param.*": torch.ones(3, width + 8)},
                     server.lora.parent / "e2e_bundle_wide.safetensors", metadata=meta)
    assert server.request("POST", "/lora-workshop/v1/refresh")[0] == 200
    server.txt2img("a photo of e2ewide <lora:e2e_bundle_wide:1>")
    status, body = server.request("GET", "/sdapi/v1/embeddings")
    assert status == 200 and "e2ewide" not in body["loaded"], body
    assert (body["skipped"]["e2ewide"]["shape"], body["skipped"]["e2ewide"]["vectors"]) == (width + 8, 3), body
