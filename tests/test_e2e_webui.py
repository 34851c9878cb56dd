"""End-to-end: the real AUTOMATIC1111 WebUI with LoRA Workshop linked in (skipped unless WEBUI_DIR is set).

Run it against a WebUI checkout (v1.10.x) whose environment is already prepared (its venv
installed, ``repositories/`` cloned — i.e. it has been started once):

    WEBUI_DIR=/path/to/stable-diffusion-webui \\
    [WEBUI_PYTHON=/path/to/stable-diffusion-webui/venv/bin/python] \\
    [WEBUI_E2E_CKPT=/path/to/any-sd1.safetensors WEBUI_E2E_LORA=/path/to/an-sd1-lora.safetensors] \\
    [WEBUI_E2E_TIMEOUT=900] \\
    .venv/bin/python -m pytest tests/test_e2e_webui.py -v

What it does: makes a throw-away ``--data-dir`` with ``extensions/lora-workshop`` symlinked
to this repository, a checkpoint and a LoRA, then starts

    python launch.py --skip-prepare-environment --skip-install --no-download-sd-model
        --skip-torch-cuda-test --use-cpu all --no-half --api --api-auth e2e:e2e-pass
        --data-dir <tmp> --ckpt <ckpt> --port <free port> --skip-version-check

and talks to it over HTTP.  Without WEBUI_E2E_CKPT a tiny SD1 checkpoint is generated
(tiny UNet and VAE with a .yaml next to it; the text encoder has CLIP ViT-L/14's shape with
random weights), plus a LoRA for it.  The WebUI still needs the ViT-L/14 *tokenizer and
config* from the Hugging Face cache, as for any SD1 model (set HF_HUB_OFFLINE=1 when cached).
With WEBUI_E2E_CKPT you must also give a matching WEBUI_E2E_LORA.  The server log is kept in
the temp folder and its tail is printed when something fails.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEBUI_DIR = os.environ.get("WEBUI_DIR")
AUTH = ("e2e", "e2e-pass")
LORA_NAME = "e2e_lora"

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason="set WEBUI_DIR to a prepared stable-diffusion-webui checkout")

# A tiny SD1: the real ldm classes, small widths; the VAE downsamples 8x like every SD VAE.
TINY_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    timesteps: 1000
    first_stage_key: jpg
    cond_stage_key: txt
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    scale_factor: 0.18215
    use_ema: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {unet}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {vae}
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
            num_res_blocks=1, channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
VAE = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
           num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _tiny_checkpoint(folder: Path, lora_dir: Path) -> tuple[Path, Path]:
    """tiny.safetensors + tiny.yaml, and a LoRA for its cross-attention and text-encoder q_proj layers."""
    import torch
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from lib_lora.fileio import save_safetensors
    from lib_lora.modelmap import ModelMap

    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    # AutoencoderKL's own layers, built without it (it imports pytorch_lightning)
    vae = torch.nn.Module()
    vae.encoder, vae.decoder = Encoder(**VAE), Decoder(**VAE)
    vae.quant_conv = torch.nn.Conv2d(2 * VAE["z_channels"], 2 * 4, 1)
    vae.post_quant_conv = torch.nn.Conv2d(4, VAE["z_channels"], 1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", te)):
        sd.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    ckpt = folder / "tiny.safetensors"
    save_file(sd, str(ckpt))
    (folder / "tiny.yaml").write_text(TINY_YAML.format(unet=json.dumps(UNET), vae=json.dumps(VAE)))

    mm = ModelMap.build("sd1", unet, [("te", te)])
    g = torch.Generator().manual_seed(1)
    lora = {}
    for t in mm.targets:
        w = t.weight()
        if w.dim() == 2 and ("attn2" in t.key or t.key.endswith("q_proj")):
            lora[f"{t.key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
            lora[f"{t.key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
            lora[f"{t.key}.alpha"] = torch.tensor(4.0)
    path = save_safetensors(lora, lora_dir / f"{LORA_NAME}.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    return ckpt, path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, proc: subprocess.Popen, log: Path, lora: Path):
        self.base, self.proc, self.log, self.lora = base, proc, log, lora

    def request(self, method: str, path: str, body=None, auth=AUTH, timeout=600):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def log_tail(self, n=4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def txt2img(self, prompt: str) -> dict:
        status, res = self.request("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": 1234, "steps": 2, "width": 64, "height": 64,
            "cfg_scale": 3, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1})
        assert status == 200, f"txt2img failed: {res}\n{self.log_tail()}"
        return {"image": res["images"][0], "info": json.loads(res["info"])}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    webui = Path(WEBUI_DIR)
    if not (webui / "launch.py").is_file() or not (webui / "repositories").is_dir():
        pytest.skip(f"{webui} is not a prepared WebUI checkout (launch.py and repositories/ needed)")
    python = os.environ.get("WEBUI_PYTHON") or next(
        (str(p) for p in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe") if p.exists()),
        sys.executable)
    data = tmp_path_factory.mktemp("webui-data")
    ckpt_dir, lora_dir = data / "models" / "Stable-diffusion", data / "models" / "Lora"
    ckpt_dir.mkdir(parents=True)
    lora_dir.mkdir(parents=True)
    (data / "extensions").mkdir()
    os.symlink(ROOT, data / "extensions" / "lora-workshop", target_is_directory=True)
    if os.environ.get("WEBUI_E2E_CKPT"):
        if not os.environ.get("WEBUI_E2E_LORA"):
            pytest.skip("WEBUI_E2E_CKPT needs a matching WEBUI_E2E_LORA")
        ckpt = Path(os.environ["WEBUI_E2E_CKPT"])
        lora = Path(shutil.copy(os.environ["WEBUI_E2E_LORA"], lora_dir / f"{LORA_NAME}.safetensors"))
    else:
        pytest.importorskip("ldm")
        ckpt, lora = _tiny_checkpoint(ckpt_dir, lora_dir)

    port = _free_port()
    log = data / "webui.log"
    cmd = [python, "launch.py", "--skip-prepare-environment", "--skip-install", "--no-download-sd-model",
           "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--api", "--api-auth", ":".join(AUTH),
           "--data-dir", str(data), "--ckpt", str(ckpt), "--port", str(port), "--skip-version-check"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COMMANDLINE_ARGS": ""}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=webui, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, lora)
    deadline = time.time() + float(os.environ.get("WEBUI_E2E_TIMEOUT", "900"))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the WebUI exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if srv.request("GET", "/lora-workshop/v1/loras", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the WebUI did not come up in time:\n{srv.log_tail()}")
            time.sleep(2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    assert with_lora["image"] != plain["image"], "the LoRA changed nothing"
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

    data = tmp_path / "dataset" / "2_e2etrig"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 30 * i, 40)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("e2etrig, red square", encoding="utf-8")
    before = server.txt2img("a photo")
    body = {"output_name": "e2e_trained", "dataset": {"train_dir": str(data.parent), "resolution": 64,
                                                      "min_bucket_reso": 64, "max_bucket_reso": 128},
            "network": {"rank": 4, "alpha": 4}, "max_train_steps": 3, "save_precision": "fp32",
            "sample_every_n_steps": 0}
    assert server.request("POST", "/lora-workshop/v1/train", {**body, "output_name": "../x"})[0] == 400
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
    names = [x["name"] for x in server.request("GET", "/lora-workshop/v1/loras")[1]]
    assert "e2e_trained" in names
    assert server.txt2img("a photo")["image"] == before["image"], "training changed the loaded model"
    assert server.txt2img("a photo <lora:e2e_trained:1>")["image"] != before["image"]
