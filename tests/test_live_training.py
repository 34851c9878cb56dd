"""Generations between training steps, on a CLI-style host: determinism, restore, live = saved, keep.

The host here is the command line's: a single-file-style ``Checkpoint`` (tiny SD1, real ``ldm``
UNet, HF CLIP, diffusers VAE) trained by the ``JobRunner``, and a ``Runtime`` over the LoRA folder
rendering with the CLI's own DDIM sampler.  At chosen step boundaries the host says a generation
waits; its ``yield_lock`` then runs that generation (in the training thread: the lock is lent to
it) with ``<lora:NAME@live>`` and restores the model, as the WebUI host does.  The references are
independent of the interleaving: the same run without generations, and files saved by the trainer
itself at the same step.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import tiny_models as tm
from loras import same, snapshot
from lib_lora.autocast import autocasting
from lib_lora.fileio import load_file, read_header
from lib_lora.hosts.cli.checkpoint import Checkpoint
from lib_lora.hosts.cli.sampling import sample
from lib_lora.library import Library
from lib_lora.live import INFOTEXT_KEY, format_infotext
from lib_lora.modelmap import ModelMap
from lib_lora.params import parse_prompt
from lib_lora.runtime import Runtime
from lib_lora.training import jobs
from lib_lora.training.host import TrainingHost
from lib_lora.training.model import TrainableModel
from train_support import tiny_vae

STEPS = 4


@pytest.fixture(scope="module")
def ck():
    tiny = tm.build_sd1(seed=5)
    return Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae(), resolution=64)


def render(c: Checkpoint, prompt: str, seed: int = 3) -> tuple[bytes, bytes]:
    """The 8-bit image, and the float outputs of the text encoder and the UNet on fixed inputs (a
    difference below one 8-bit level still shows there)."""
    image = np.asarray(sample(c, prompt, steps=3, cfg=5.0, seed=seed, width=64, height=64)[0]).tobytes()
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(1, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g), torch.tensor([500])
    with torch.no_grad():
        context = c.encode_text([prompt]).context
        out = c.unet(x, t, context=context)
    return image, context.numpy().tobytes() + out.numpy().tobytes()


class CliHost(TrainingHost):
    """The command line's model, LoRA folder and renderer, with generations waiting at ``at`` steps.

    ``generation(host, job)`` runs in the gap, with the lock lent to it; afterwards the runtime is
    restored, as any host must before handing the model back to training."""

    name = "cli-test"

    def __init__(self, c: Checkpoint, out, at=(), generation=None):
        self.c, self.out, self.at, self.generation = c, out, set(at), generation
        self.runtime = Runtime(Library([out]))
        self.runtime.set_model(ModelMap.build(c.family, c.unet, c.text_encoders))
        self.job: jobs.Job | None = None
        self.seen: list[dict] = []            # what each generation found
        self.base: list[torch.Tensor] | None = None
        self.base_at_boundaries: list[bool] = []  # training sees the weights as loaded at every step boundary

    def family(self):
        return "sd1"

    def output_dir(self):
        return self.out

    def build_model(self, job) -> TrainableModel:
        self.job = job
        self.base = snapshot(self.c.unet, *[te for _, te in self.c.text_encoders])
        return self.c.trainable()

    def live_registry(self):
        return self.runtime.live

    def yield_interval(self):
        return 0.0 if self.at else None

    def generation_waiting(self) -> bool:
        self.base_at_boundaries.append(same(self.base, snapshot(self.c.unet, *[te for _, te in self.c.text_encoders])))
        return self.job is not None and self.job.step in self.at and self.job.step not in {s["step"] for s in self.seen}

    def yield_lock(self, job) -> None:
        unet = self.c.unet
        seen = {"step": job.step, "paused": job.paused,
                "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
                "instance_forwards": sum("forward" in vars(m) for m in unet.modules()),
                "training_modes": sum(m.training for m in unet.modules()),
                "requires_grad": [p.requires_grad for p in unet.parameters()],
                "autocast": autocasting("cpu"), "weights": snapshot(unet, *[te for _, te in self.c.text_encoders])}
        seen.update(self.generation(self, job) if self.generation else {})
        self.runtime.restore()
        self.seen.append(seen)


def request(data, name="zkx", **kw) -> dict:
    body = {"output_name": name, "dataset": {"train_dir": str(data), "resolution": 64, "enable_buckets": False},
            "network": {"rank": 4, "alpha": 4, "train_text_encoder": True}, "max_train_epochs": None,
            "max_train_steps": STEPS, "learning_rate": 1e-2, "min_snr_gamma": None, "save_precision": "fp16",
            "seed": 7}
    body.update(kw)
    return body


def run(host: CliHost, body: dict) -> jobs.Job:
    job = jobs.JobRunner(host).start(body)
    assert job.wait(300), "the job did not end"
    assert job.state == "finished", (job.error, list(job.logs))
    return job


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path)[0]


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and same([a[k] for k in sorted(a)], [b[k] for k in sorted(b)])


def generate_live(host: CliHost, job) -> dict:
    """A txt2img with the live LoRA at te/unet weights and block weights; it reseeds and draws from the
    global RNGs as a WebUI generation does (training must not depend on them)."""
    torch.manual_seed(1000 + job.step)
    torch.rand(5)
    random.seed(job.step)
    np.random.seed(job.step)
    prompt, requests = parse_prompt("zkx, red square <lora:zkx@live:0.7:1.3:lbw=1,1,1,1,1,1,1,0,1,1,1,1,1,1,1,1,1>")
    res = host.runtime.activate(requests)
    image = render(host.c, prompt)
    return {"image": image, "res": res}


# -- determinism, restore, gradients -----------------------------------------------------------------


def test_generations_between_steps_change_nothing_in_training(ck, data, tmp_path):
    before = snapshot(ck.unet, *[te for _, te in ck.text_encoders])
    flags = [p.requires_grad for p in ck.unet.parameters()]
    plain = run(CliHost(ck, tmp_path / "a"), request(data))
    host = CliHost(ck, tmp_path / "b", at=(1, 2, 3), generation=generate_live)
    mixed = run(host, request(data))

    # determinism: the same file bit for bit; gradients: the same loss at every step, the one after a pause included
    assert bitwise_equal(tensors(plain.output), tensors(mixed.output))
    assert mixed.losses == plain.losses and len(mixed.losses) == STEPS
    assert [s["step"] for s in host.seen] == [1, 2, 3] and mixed.pauses == 3 and mixed.time_paused > 0

    for s in host.seen:
        # the generation got the model as loaded: no hook, instance forward, train mode, autocast or changed flag
        assert s["paused"] and s["hooks"] == 0 and s["instance_forwards"] == 0 and s["training_modes"] == 0
        assert s["requires_grad"] == flags and s["autocast"] is False
        assert same(s["weights"], before)  # bitwise as loaded when the generation began...
        assert s["res"].applied == ["zkx@live"] and not s["res"].messages
    assert host.base_at_boundaries == [True] * (STEPS - 1)  # ... when training went on ...
    assert same(snapshot(ck.unet, *[te for _, te in ck.text_encoders]), before)  # ... and after the job
    # the LoRA moved between steps, and so did what it renders
    assert len({s["image"] for s in host.seen}) == 3
    assert len({s["res"].hashes[0][1] for s in host.seen}) == 3


def test_live_weights_render_as_the_file_saved_at_that_step(ck, data, tmp_path):
    out = tmp_path / "loras"
    host = CliHost(ck, out, at=(2,), generation=generate_live)
    job = run(host, request(data, save_every_n_steps=2))
    saved = out / "zkx-step00000002.safetensors"
    assert saved.is_file()

    # the file, loaded like any LoRA, with the same arguments
    rt = Runtime(Library([out]))
    rt.set_model(ModelMap.build(ck.family, ck.unet, ck.text_encoders))
    prompt, requests = parse_prompt("zkx, red square <lora:zkx-step00000002:0.7:1.3:lbw=1,1,1,1,1,1,1,0,1,1,1,1,1,1,1,1,1>")
    res = rt.activate(requests)
    from_file = render(ck, prompt)
    rt.restore()
    live = host.seen[0]
    assert res.applied == ["zkx-step00000002"] and live["image"] == from_file

    # the arguments took effect (plain weight 1 renders otherwise), and the snapshot is the file's hash
    header = read_header(saved).metadata
    snap = live["res"].live[0][1]
    assert (snap.step, snap.job, snap.hash) == (2, job.id, header["sshs_model_hash"])
    assert live["res"].hashes == [("zkx@live", header["sshs_model_hash"][:12])]
    assert format_infotext(live["res"].live) == f"zkx@live: job {job.id} step 2 hash {header['sshs_model_hash'][:12]}"
    assert INFOTEXT_KEY == "LoRA Workshop live"
    _, requests = parse_prompt("zkx, red square <lora:zkx-step00000002:1>")
    rt.activate(requests)
    assert render(ck, "zkx, red square") != from_file
    rt.restore()


def test_keep_this_state_saves_a_step_file_and_training_goes_on(ck, data, tmp_path):
    kept = {}

    def keep_during_generation(host, job):
        kept["request"] = job.request_keep()  # answered at this same boundary, once the generation is done
        return {}

    host = CliHost(ck, tmp_path / "k", at=(3,), generation=keep_during_generation)
    job = run(host, request(data))
    path = kept["request"].wait(1)
    assert path.name == "zkx-step00000003.safetensors" and kept["request"].step == 3
    meta = read_header(path).metadata
    assert meta["ss_steps"] == "3" and meta["ss_output_name"] == "zkx" and meta["ss_epoch"] == "0"
    assert meta["sshs_model_hash"] and meta["modelspec.architecture"]
    # the run went on to its end, and its file is the one an uninterrupted run writes
    assert job.step == STEPS and job.output.name == "zkx.safetensors" and path in job.saved
    plain = run(CliHost(ck, tmp_path / "p"), request(data, save_every_n_steps=3))
    assert bitwise_equal(tensors(job.output), tensors(plain.output))
    assert bitwise_equal(tensors(path), tensors(tmp_path / "p" / "zkx-step00000003.safetensors"))


def test_live_name_outside_a_pause_or_a_job_is_a_message(ck, data, tmp_path):
    host = CliHost(ck, tmp_path / "m")
    _, requests = parse_prompt("x <lora:zkx@live:1>")
    res = host.runtime.activate(requests)
    assert res.applied == [] and res.messages == [
        "Lora not found: zkx@live (no training job with output name 'zkx' is running; '@live' names the weights of "
        "a running job)"]

    during = {}

    def probe(h, job):  # a generation while the job trains (not paused) cannot read its weights
        during["names"] = h.runtime.live.names()
        return {}

    host.generation = probe
    host.at = {1}
    runner = jobs.JobRunner(host)
    job = runner.start(request(data, max_train_steps=2))
    assert job.wait(300) and job.state == "finished"
    assert during["names"] == ["zkx@live"]
    res = host.runtime.activate(requests)  # the job ended: the name is gone again
    assert "no training job with output name 'zkx' is running" in res.messages[0]
    source = jobs.Interleaver(job, host).source
    with pytest.raises(LookupError, match="weights apply only in generations that run while it pauses"):
        source.snapshot()
