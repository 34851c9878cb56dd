"""A real AUTOMATIC1111 WebUI, started for the end-to-end suite and the generation benchmark.

``data_dir`` lays out a throw-away ``--data-dir`` (this repository linked in as an extension,
optionally the built-in Lora disabled through the WebUI's own settings file), ``tiny_checkpoint``
writes a tiny SD1 built from the real ``ldm`` classes, and ``running`` starts ``launch.py``
offline on CPU and yields a ``Server`` to talk to over HTTP; ``GradioUI`` calls the page's event
handlers the way the browser does.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import hf_clip_l

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("e2e", "e2e-pass")
LORA_NAME = "e2e_lora"


# Code run in the WebUI's venv (after ``import sys, types, torch`` and the WebUI on sys.path): its SD3
# classes, MMDiT and other_impls, without importing the whole WebUI, which other_impls pulls in through
# modules.sd_hijack for one embedding class only.
WEBUI_SD3_IMPORTS = '''hijack = types.ModuleType("modules.sd_hijack")
class TextualInversionEmbeddings(torch.nn.Embedding):
    def __init__(self, num, dim, textual_inversion_key="clip_l", **kw):
        super().__init__(num, dim, **kw)
hijack.TextualInversionEmbeddings = TextualInversionEmbeddings
import modules
sys.modules["modules.sd_hijack"] = hijack
modules.sd_hijack = hijack
from modules.models.sd3.mmdit import MMDiT
from modules.models.sd3 import other_impls
'''

class StartError(RuntimeError):
    """The WebUI exited or did not answer in time; the message ends with its log's tail."""


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


def tiny_checkpoint(folder: Path, lora_dir: Path, lora_name: str = LORA_NAME,
                    more_loras: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """tiny.safetensors + tiny.yaml, and a LoRA for its cross-attention and text-encoder q_proj layers
    (``more_loras``: further names, each with other random weights); returns (checkpoint, first LoRA)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from lib_lora.fileio import save_safetensors
    from lib_lora.modelmap import ModelMap

    unet, vae, te = tiny_modules()
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", te)):
        sd.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    ckpt = folder / "tiny.safetensors"
    save_file(sd, str(ckpt))
    (folder / "tiny.yaml").write_text(TINY_YAML.format(unet=json.dumps(UNET), vae=json.dumps(VAE)))

    mm = ModelMap.build("sd1", unet, [("te", te)])
    path = None
    for seed, name in enumerate((lora_name, *more_loras), start=1):
        g = torch.Generator().manual_seed(seed)
        lora = {}
        for t in mm.targets:
            w = t.weight()
            if w.dim() == 2 and ("attn2" in t.key or t.key.endswith("q_proj")):
                lora[f"{t.key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
                lora[f"{t.key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
                lora[f"{t.key}.alpha"] = torch.tensor(4.0)
        written = save_safetensors(lora, lora_dir / f"{name}.safetensors", metadata={"ss_base_model_version": "sd_v1"})
        path = path or written
    return ckpt, path


def tiny_modules():
    """The tiny checkpoint's UNet, VAE layers and text encoder (fp32, the same weights each call)."""
    import torch
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    for m in unet.modules():
        # ldm zero-inits each block's last layer and the output conv: the UNet would predict 0 whatever its
        # prompt or LoRA, and no image could show a LoRA's effect
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    # AutoencoderKL's own layers, built without it (it imports pytorch_lightning)
    vae = torch.nn.Module()
    vae.encoder, vae.decoder = Encoder(**VAE), Decoder(**VAE)
    vae.quant_conv = torch.nn.Conv2d(2 * VAE["z_channels"], 2 * 4, 1)
    vae.post_quant_conv = torch.nn.Conv2d(4, VAE["z_channels"], 1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    with torch.no_grad():
        # a fresh final LayerNorm makes every embedding zero-mean, and the WebUI's "Original" emphasis
        # rescales by the mean: 0/0 (NaN) where the sum rounds to exactly 0, as on one thread
        te.text_model.final_layer_norm.bias.normal_(0, 0.5)
    return unet, vae, te


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, proc: subprocess.Popen, log: Path, lora: Path | None, ckpt: Path):
        self.base, self.proc, self.log, self.lora, self.ckpt = base, proc, log, lora, ckpt

    def request(self, method: str, path: str, body=None, auth=AUTH, timeout=600):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:  # an HTML page or a plain-text error
            return status, raw.decode(errors="replace")

    def log_tail(self, n=4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def txt2img(self, prompt: str, **overrides) -> dict:
        """One 64 px image, seed 1234, 2 Euler steps; ``overrides`` replace fields of the request."""
        status, res = self.request("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": 1234, "steps": 2, "width": 64, "height": 64,
            "cfg_scale": 3, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, **overrides})
        assert status == 200, f"txt2img failed: {res}\n{self.log_tail()}"
        return {"image": res["images"][0], "info": json.loads(res["info"])}

    def txt2img_logged(self, prompt: str) -> tuple[dict, str]:
        """``txt2img``, and what the server printed meanwhile (our messages go there even when the info has none)."""
        start = self.log.stat().st_size
        res = self.txt2img(prompt)
        with open(self.log, "rb") as f:
            f.seek(start)
            return res, f.read().decode(errors="replace")


class GradioUI:
    """The UI's event handlers, called the way the browser does (``/run/predict`` with an fn_index)."""

    def __init__(self, server: Server):
        self.server = server
        status, self.config = server.request("GET", "/config", auth=None)
        assert status == 200
        self.by_id = {c["id"]: c for c in self.config["components"]}

    def elem(self, elem_id: str) -> int:
        [cid] = [i for i, c in self.by_id.items() if c.get("props", {}).get("elem_id") == elem_id]
        return cid

    def fn_index(self, trigger: str, *, target: str | None = None, output: str | None = None) -> int:
        """The one event of ``trigger`` on the component ``target`` (or, for "load", that fills ``output``)."""
        found = [i for i, d in enumerate(self.config["dependencies"]) if d["trigger"] == trigger
                 and (target is None or self.elem(target) in d["targets"])
                 and (output is None or self.elem(output) in d["outputs"])]
        assert len(found) == 1, (trigger, target, output, found)
        return found[0]

    def call(self, fn_index: int, *data, event_data: dict | None = None) -> list:
        """``event_data``: what the browser sends with a select event (``{"index": …, "value": …}``)."""
        body = {"fn_index": fn_index, "data": list(data), "session_hash": "e2e"}
        if event_data is not None:
            body["event_data"] = event_data
        status, res = self.server.request("POST", "/run/predict", body, auth=None)
        assert status == 200, f"{res}\n{self.server.log_tail()}"
        return res["data"]

    def outputs(self, fn_index: int, data: list) -> dict[int, object]:
        return dict(zip(self.config["dependencies"][fn_index]["outputs"], data))


def pixels(image_b64: str) -> bytes:
    """The decoded RGB pixels: the PNG itself also carries the infotext, i.e. the prompt with its <lora:> tokens."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB").tobytes()


def webui_python(webui: Path) -> str:
    return os.environ.get("WEBUI_PYTHON") or next(
        (str(p) for p in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe") if p.exists()),
        sys.executable)


def data_dir(data: Path, *, extension: bool = True, builtin_off: bool = False,
             others: dict[str, Path] | None = None) -> tuple[Path, Path]:
    """Lay out a ``--data-dir`` (``others``: more extension folders, linked in under these names);
    returns (checkpoint folder, LoRA folder)."""
    ckpt_dir, lora_dir = data / "models" / "Stable-diffusion", data / "models" / "Lora"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    (data / "extensions").mkdir(exist_ok=True)
    if extension:
        os.symlink(ROOT, data / "extensions" / "lora-workshop", target_is_directory=True)
    for name, folder in (others or {}).items():
        os.symlink(Path(folder).resolve(), data / "extensions" / name, target_is_directory=True)
    if builtin_off:
        # there is no command-line switch for one extension; the WebUI reads this list from its settings file
        (data / "config.json").write_text(json.dumps({"disabled_extensions": ["Lora"]}))
    return ckpt_dir, lora_dir


@contextlib.contextmanager
def running(webui: Path, data: Path, ckpt: Path, lora: Path | None = None, *, timeout: float = 900,
            ready: str = "/sdapi/v1/sd-models", extra_args: tuple[str, ...] = (),
            hf_home: Path | None = None) -> Iterator[Server]:
    """``launch.py --api`` on CPU with ``data`` as its data dir, until ``ready`` answers 200; stopped on exit.
    ``hf_home``: an HF_HOME whose hub cache already holds other snapshots the model needs; the WebUI then
    runs offline on it (CLIP ViT-L/14's tokenizer and config added there when missing)."""
    port = free_port()
    log = data / "webui.log"
    cmd = [webui_python(webui), "launch.py", "--skip-prepare-environment", "--skip-install", "--no-download-sd-model",
           "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--api", "--api-auth", ":".join(AUTH),
           "--data-dir", str(data), "--ckpt", str(ckpt), "--port", str(port), "--skip-version-check", *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COMMANDLINE_ARGS": ""}
    if hf_home is not None or hf_clip_l.cached_snapshot(hf_clip_l.hub_cache()) is None:
        # SD1's text encoder loads CLIP ViT-L/14's tokenizer and config by hub name: serve them offline
        hf_home = hf_home or data / "hf"
        if hf_clip_l.cached_snapshot(hf_home / "hub") is None:
            hf_clip_l.write_snapshot(hf_home / "hub")
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
            env.pop(var, None)
        env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=webui, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, lora, ckpt)
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise StartError(f"the WebUI exited with {proc.returncode}:\n{srv.log_tail()}")
            # no request before the WebUI has added its API middleware (its "Startup time:" line comes after):
            # starlette refuses middleware once a first request has built the app, and the WebUI exits
            try:
                if "Startup time:" in log.read_text(errors="replace") and \
                        srv.request("GET", ready, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise StartError(f"the WebUI did not come up in time:\n{srv.log_tail()}")
            time.sleep(2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
