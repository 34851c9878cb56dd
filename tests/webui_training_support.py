"""The stand-in WebUI with a tiny SD1 loaded, for the tests of training inside the WebUI
(test_webui_training.py, test_webui_live.py; their fixtures are conftest's ``sd_model``, ``data`` and
``training_webui``).

A tiny real SD1 (ldm UNet, HF CLIP behind a WithCustomWords-style wrapper, diffusers VAE) is laid
out like the WebUI's ``shared.sd_model``; ``Gate`` pauses a job's thread at a chosen step.
"""
from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import processing, sd_models, shared  # noqa: E402
from modules.options import OptionInfo  # noqa: E402

from lib_lora.hosts import webui_training as wt  # noqa: E402
from lib_lora.training import jobs  # noqa: E402
from tiny_models import build_sd1  # noqa: E402
from train_support import tiny_vae  # noqa: E402

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

TIMEOUT = 60


# -- a tiny SD1 laid out like the WebUI's sd_model ---------------------------------------------------


class FrozenCLIPEmbedder(nn.Module):      # ldm's embedder: the HF model is .transformer
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class CLIPWithCustomWords(nn.Module):
    """sd_hijack_clip's wrapper as far as training uses it: the original is ``.wrapped``; texts in, context out.

    As WebUI 1.10.1's: ``process_texts`` cuts each text into chunks of ``chunk_length`` (75) tokens, each
    encoded as 77 with its start and end tokens, ``forward`` encodes a batch chunk by chunk (a shorter
    text's missing chunks are ``empty_chunk()``) and joins them along the tokens.  Simplified: no comma
    back-tracking, no emphasis, and padding with 0 as open_clip pads (the real SD1 pads with the end token)."""
    chunk_length = 75

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    @staticmethod
    def _chunk(ids: list[int]):
        from open_clip.tokenizer import _tokenizer as bpe
        tokens = [bpe.encoder["<start_of_text>"], *ids, bpe.encoder["<end_of_text>"]]
        return types.SimpleNamespace(tokens=tokens + [0] * (77 - len(tokens)))

    def empty_chunk(self):
        return self._chunk([])

    def tokenize(self, texts):
        """Token ids without start and end tokens, as the real wrapper's (the embedding database asks for them)."""
        from open_clip.tokenizer import _tokenizer as bpe
        return [bpe.encode(text) for text in texts]

    def process_texts(self, texts):
        from open_clip.tokenizer import _tokenizer as bpe
        out, most = [], 0
        for text in texts:
            ids = bpe.encode(text)
            most = max(most, len(ids))
            out.append([self._chunk(ids[i:i + 75]) for i in range(0, max(len(ids), 1), 75)])
        return out, most

    def forward(self, texts):
        batch_chunks, _ = self.process_texts(texts)
        zs = []
        for i in range(max(len(c) for c in batch_chunks)):
            tokens = torch.tensor([(c[i] if i < len(c) else self.empty_chunk()).tokens for c in batch_chunks])
            zs.append(self._encode(tokens))
        return torch.hstack(zs)

    def _encode(self, tokens):
        # as WebUI 1.10.1 encodes: at Clip skip N > 1, the hidden state N from the end, then the final layer norm
        skip = shared.opts.CLIP_stop_at_last_layers
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class TinySD1(nn.Module):
    """The attributes of ldm's LatentDiffusion (as the WebUI leaves them) that training uses."""

    def __init__(self):
        super().__init__()
        tiny = build_sd1(seed=3)
        self.model = DiffusionWrapper(tiny.unet)
        self.cond_stage_model = CLIPWithCustomWords(FrozenCLIPEmbedder(tiny.text_encoders[0][1]))
        self.first_stage_model = tiny_vae()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = True, False, False, False
        self.sd_checkpoint_info = types.SimpleNamespace(
            filename="/webui/models/Stable-diffusion/tiny.safetensors", name="tiny.safetensors",
            model_name="tiny", title="tiny.safetensors [abcdef0123]", short_title="tiny [abcdef0123]",
            sha256="ab" * 32, shorthash="abcdef0123", hash="12345678")
        self.sd_model_checkpoint = self.sd_checkpoint_info.filename  # what reload_model_weights compares

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist   # ldm: a DiagonalGaussianDistribution

    def get_first_stage_encoding(self, posterior):
        return posterior.sample() * 0.18215


def unet_hooks(m: TinySD1) -> int:
    """What is attached to the UNet's modules: forward hooks and instance forwards (our LoRA'd layers')."""
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) + ("forward" in vars(x))
               for x in m.model.diffusion_model.modules())


# -- the stand-in WebUI -------------------------------------------------------------------------------


class TrainingWebUI:
    """The stand-in WebUI (conftest's) with ``model`` loaded as the tiny SD1 checkpoint; ``start`` loads the extension."""

    def __init__(self, base, model):
        self.base, self.lora_dir = base, base.lora_dir
        mp = base.mp
        for flag in ("lowvram", "medvram", "medvram_sdxl"):
            mp.setattr(shared.cmd_opts, flag, False)
        shared.opts.add_option("fp8_storage", OptionInfo("Disable"))
        shared.opts.add_option("sd_model_checkpoint", OptionInfo("tiny.safetensors [abcdef0123]"))
        mp.setattr(shared, "sd_model", model)
        mp.setattr(processing, "process_callbacks", [])
        mp.setattr(processing, "calls", [])
        self.client: TestClient | None = None

    def start(self, auth: str | None = None) -> TestClient:
        registered = dict(sd_models.checkpoint_aliases)  # a test's own checkpoints; listing clears them
        self.client = self.base.start(auth, components=("txt2img_prompt",))
        # the loaded checkpoint is in the WebUI's list under the title the setting names
        info = sd_models.CheckpointInfo(shared.sd_model.sd_checkpoint_info.filename)
        info.title = info.ids[1] = shared.opts.sd_model_checkpoint
        info.register()
        sd_models.checkpoint_aliases.update(registered)
        return self.client

    @property
    def runner(self) -> jobs.JobRunner:
        return wt.get_runner()

    def wait(self, job_id: str, auth=None) -> dict:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            st = self.client.get(f"/lora-workshop/v1/train/{job_id}", auth=auth).json()
            if st["state"] in ("finished", "stopped", "failed"):
                return st
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not end: {st}")

    def cleanup(self):
        for gate in Gate.open_gates:
            gate.release.set()
        Gate.open_gates.clear()
        runner = wt._runners.current
        if runner is not None:
            for job in runner.jobs():
                if job.active:
                    job.request_stop()
                job.wait(TIMEOUT)


class Gate:
    """Pauses the training thread right after the host reported step ``at``."""
    open_gates: list["Gate"] = []

    def __init__(self, monkeypatch, at: int):
        self.at, self.reached, self.release = at, threading.Event(), threading.Event()
        Gate.open_gates.append(self)
        original = wt.WebUITrainingHost.progress
        gate = self

        def progress(host_, job):
            original(host_, job)
            if job.step == gate.at and not gate.reached.is_set():
                gate.reached.set()
                gate.release.wait(TIMEOUT)

        monkeypatch.setattr(wt.WebUITrainingHost, "progress", progress)

    def wait(self):
        assert self.reached.wait(TIMEOUT), "the job never reached the gate"


def request(data: Path, name: str = "zkx", **kw) -> dict:
    req = {"output_name": name, "preset": "sd15",
           "dataset": {"train_dir": str(data), "resolution": 64, "enable_buckets": False},
           "network": {"rank": 4, "alpha": 4}, "max_train_epochs": None, "max_train_steps": 4,
           "learning_rate": 1e-3, "min_snr_gamma": None, "save_precision": "fp32"}
    req.update(kw)
    return req
