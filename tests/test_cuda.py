"""The CUDA paths: training a half-precision model as the WebUI loads it (autocast, fp16 loss
scaling), the frozen-layer backward on GPU kernels, and merging into a half model on the GPU.

CI has no GPU, so these skip there; `tools/device_check.sh` runs them on one.
``LORA_TEST_DEVICE=cpu`` runs the device-independent parts here (a dry run of the tests themselves).
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from lib_lora.cli import main
from lib_lora.fileio import load_safetensors
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network, parse_state_dict
from lib_lora.patcher import Patcher
from lib_lora.training.network import NetworkConfig, TrainingNetwork
from lib_lora.training.plan import make_plan
from lib_lora.training.trainer import Callbacks, Trainer
from loras import activation, kohya_lora, same, snapshot
from test_cli_train import args
from test_frozen_layers import _lora_grads
from test_training import config, module_state
from tiny_models import build_sd1, build_sdxl
from train_support import tiny_vae, trainable

DEVICE = os.environ.get("LORA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_device(tiny, dtype: torch.dtype):
    """The tiny model as a WebUI holds a checkpoint: on the GPU, in its half type (ldm's
    ``use_fp16`` makes the UNet cast its input to that type)."""
    for m in [tiny.unet] + [te for _, te in tiny.text_encoders]:
        m.to(DEVICE, dtype)
    tiny.unet.dtype = dtype
    return tiny


@pytest.fixture
def no_tf32():
    """fp32 means fp32 here (cuDNN convolutions default to TF32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _allocated() -> int:
    gc.collect()
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _yard_loss(model, lat, cond, n: int = 8) -> float:
    """Denoising loss on the training latents at fixed noise and timesteps, under autocast as
    the host generates."""
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16, enabled=DEVICE == "cuda"):
        for _ in range(n):
            noise = torch.randn(lat.shape, generator=g).to(DEVICE)
            t = torch.randint(100, 900, (lat.shape[0],), generator=g).to(DEVICE)
            acp = model.alphas_cumprod.to(DEVICE)[t].view(-1, 1, 1, 1)
            pred = model.predict((acp.sqrt() * lat + (1 - acp).sqrt() * noise).to(model.unet.dtype), t, cond)
            total += torch.nn.functional.mse_loss(pred.float(), noise).item()
    return total / n


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_full_half_lora_weights_on_the_gpu_learn_and_stay_finite(tmp_path, precision):
    """kohya's full_fp16/full_bf16 on the WebUI's fp16 model under autocast: the LoRA and its optimiser state in
    half, the loss scale's early overflows skipped (few), every weight finite, and the file draws the images."""
    weights = torch.float16 if DEVICE == "cuda" else torch.float32   # the CPU dry run: an fp32 model
    tiny = _on_device(build_sd1(seed=0), weights)
    model = trainable(tiny, tiny_vae().to(DEVICE, weights), device=DEVICE)
    log: list[str] = []
    cfg = config(tmp_path, max_train_steps=60, learning_rate=5e-3, mixed_precision=precision,
                 network=NetworkConfig(rank=8, alpha=8, conv_rank=4, conv_alpha=4),
                 **{f"full_{precision}": True})
    tr = Trainer(model, make_plan(cfg), Callbacks(log=log.append))
    ds = tr.dataset
    with torch.no_grad():
        lat = model.encode_images(torch.stack([ds.load_image(i) for i in ds.items]).to(DEVICE)).float()
        cond = model.encode_text([i.caption for i in ds.items])
    base_loss = _yard_loss(model, lat, cond)
    res = tr.run()
    skipped = [line for line in log if "step skipped" in line]
    assert res.steps == 60 and all(map(torch.isfinite, torch.tensor(res.losses))) and len(skipped) <= 10, skipped
    sd = load_safetensors(res.output)[0]
    assert all(torch.isfinite(t).all() for t in sd.values())
    p = Patcher(ModelMap.build("sd1", tiny.unet, tiny.text_encoders))
    assert not p.apply([activation(load_network(res.output))]).messages
    with torch.no_grad():
        trained_loss = _yard_loss(model, lat, model.encode_text([i.caption for i in ds.items]))
    p.restore()
    assert trained_loss < 0.8 * base_loss, (base_loss, trained_loss)


@pytest.mark.parametrize("family,weights,precision,lean", [
    ("sd1", torch.float16, "fp16", None),   # the WebUI default: fp16 weights, fp16 autocast with loss scaling
    ("sd1", torch.float16, "fp16", True),   # lean frozen layers, off by default on a GPU
    ("sd1", torch.float16, "bf16", None),
    ("sd1", torch.float32, "no", None),     # --no-half
    ("sdxl", torch.float16, "fp16", None),
])
def test_training_a_half_model_on_the_gpu_learns_and_restores_it(tmp_path, family, weights, precision, lean):
    if DEVICE != "cuda" and weights != torch.float32:
        pytest.skip("half weights train only under CUDA autocast")
    tiny = _on_device((build_sd1 if family == "sd1" else build_sdxl)(seed=0), weights)
    vae = tiny_vae().to(DEVICE, weights)
    model = trainable(tiny, vae, device=DEVICE)
    params = [(p.device, p.dtype) for p in tiny.unet.parameters()]
    before = snapshot(tiny.unet, *[te for _, te in tiny.text_encoders])
    state0 = module_state(tiny)
    network = dict(rank=8, alpha=8, conv_rank=4, conv_alpha=4)
    # a first short run: the libraries' own per-thread workspaces (cuBLAS keeps 32 MiB for the
    # autograd thread) stay allocated for the process, and are not the run's to give back
    Trainer(model, make_plan(config(tmp_path / "warm", max_train_steps=2, mixed_precision=precision,
                                    lean_frozen_layers=lean, network=NetworkConfig(**network))),
            Callbacks(log=lambda s: None)).run()
    cfg = config(tmp_path, max_train_steps=60, learning_rate=5e-3, mixed_precision=precision, lean_frozen_layers=lean,
                 network=NetworkConfig(**network))
    tr = Trainer(model, make_plan(cfg), Callbacks(log=lambda s: None))
    ds = tr.dataset
    with torch.no_grad():
        lat = model.encode_images(torch.stack([ds.load_image(i) for i in ds.items]).to(DEVICE)).float()
        cond = model.encode_text([i.caption for i in ds.items])
    base_loss = _yard_loss(model, lat, cond)
    allocated = _allocated()
    res = tr.run()
    assert res.steps == 60 and all(map(torch.isfinite, torch.tensor(res.losses)))
    # the host model: same bits, device, dtype, flags and hooks
    assert same(before, snapshot(tiny.unet, *[te for _, te in tiny.text_encoders]))
    assert [(p.device, p.dtype) for p in tiny.unet.parameters()] == params
    assert module_state(tiny) == state0
    del tr
    released = _allocated()

    # merged into the half model on the GPU, the file makes it draw the training images
    p = Patcher(ModelMap.build(family, tiny.unet, tiny.text_encoders))
    assert not p.apply([activation(load_network(res.output))]).messages
    with torch.no_grad():
        trained_loss = _yard_loss(model, lat, model.encode_text([i.caption for i in ds.items]))
    p.restore()
    assert trained_loss < 0.6 * base_loss, (base_loss, trained_loss)   # 0.38x in fp32 on CPU
    assert same(before, snapshot(tiny.unet, *[te for _, te in tiny.text_encoders]))
    assert released <= allocated + 2**20, (released, allocated)        # the run's memory given back


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
def test_frozen_layer_backward_on_gpu_kernels(build, no_tf32):
    """cuDNN/cuBLAS take the frozen layers' backward: fp32 gradients as autograd's; under fp16
    autocast on fp16 weights, as close to fp32 as autograd's own fp16 gradients."""
    ref = _lora_grads(_on_device(build(), torch.float32), lean=False, device=DEVICE)
    got = _lora_grads(_on_device(build(), torch.float32), lean=True, device=DEVICE)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got[2] < 0.9 * ref[2], (got[2], ref[2])
    if DEVICE != "cuda":
        return
    half = _on_device(build(), torch.float16)
    plain = _lora_grads(half, lean=False, amp=torch.float16, device=DEVICE)
    lean = _lora_grads(half, lean=True, amp=torch.float16, device=DEVICE)

    def error(grads) -> float:
        a, b = torch.cat([g.float().flatten() for g in grads]), torch.cat([g.flatten() for g in ref[1]])
        return ((a - b).norm() / b.norm()).item()

    assert error(lean[1]) < 1.25 * error(plain[1]) + 1e-3, (error(lean[1]), error(plain[1]))


@pytest.mark.parametrize("build", [build_sd1, build_sdxl], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("batch", [1, 2])   # one image: SD1's 1x1 proj_in/proj_out as matrix products too
def test_one_forward_per_lora_layer_on_gpu_kernels(build, batch, no_tf32, monkeypatch):
    """The LoRA'd layers' own forward (lora_layers.py) on cuBLAS: fp32 gradients as a hook and the
    LoRA's modules give them; under fp16 autocast on fp16 weights, as close to fp32 as theirs."""
    def grads(one_forward: bool, dtype: torch.dtype, amp):
        monkeypatch.setattr(TrainingNetwork, "one_forward", one_forward)
        return _lora_grads(_on_device(build(), dtype), lean=False, batch=batch, amp=amp, device=DEVICE)

    ref, got = grads(False, torch.float32, False), grads(True, torch.float32, False)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if DEVICE != "cuda":
        return
    hooks, ours = grads(False, torch.float16, torch.float16), grads(True, torch.float16, torch.float16)

    def error(g) -> float:
        a, b = torch.cat([x.float().flatten() for x in g]), torch.cat([x.flatten() for x in ref[1]])
        return ((a - b).norm() / b.norm()).item()

    assert error(ours[1]) < 1.25 * error(hooks[1]) + 1e-3, (error(ours[1]), error(hooks[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merging_into_a_half_model_on_the_gpu(dtype):
    """The patched weight equals the CPU fp64 merge cast once to the model's type; restore is exact."""
    tiny = build_sd1(seed=1)
    mm_cpu = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    sd = kohya_lora(mm_cpu, seed=8, convs=True)
    expect = {}
    for t in mm_cpu.targets:
        if f"{t.key}.lora_down.weight" in sd:
            down = sd[f"{t.key}.lora_down.weight"].double().flatten(1)
            up = sd[f"{t.key}.lora_up.weight"].double().flatten(1)
            w = t.weight().double()
            delta = float(sd[f"{t.key}.alpha"]) / down.shape[0] * (up @ down)   # LoCon too: 1x1 up
            expect[t.key] = (w.to(dtype).double() + delta.view(w.shape)).to(dtype)
    _on_device(tiny, dtype)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    before = snapshot(tiny.unet, tiny.text_encoders[0][1])
    p = Patcher(mm)
    assert not p.apply([activation(parse_state_dict("a", sd, {}))]).messages
    for key, w in expect.items():
        got = mm.get(key).module.weight
        assert got.device.type == DEVICE and got.dtype == dtype
        # deltas are summed in fp32 on the GPU: at most one unit in the last place from the fp64 sum
        torch.testing.assert_close(got.cpu().double(), w.double(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    p.restore()
    assert same(before, snapshot(tiny.unet, tiny.text_encoders[0][1]))


def test_cli_trains_in_fp16_on_the_gpu(tiny_checkpoint, tmp_path):
    """`python -m lib_lora train --mixed-precision fp16` loads the checkpoint in fp16 on the GPU."""
    ckpt, data = tiny_checkpoint
    out = tmp_path / "gpu.safetensors"
    assert main(args(ckpt, data, out, "--max-train-steps", "4", "--mixed-precision", "fp16", "--device", DEVICE)) == 0
    sd, meta = load_safetensors(out)
    assert meta["ss_mixed_precision"] == "fp16" and meta["ss_steps"] == "4"
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in sd.items())


def test_generations_between_steps_of_a_half_model_on_the_gpu(tmp_path):
    """A JobRunner job on an fp16 model on the GPU lends it to generations merging its live LoRA (the
    patcher keeps the originals on the CPU and writes them back into the GPU tensors): the job ends
    with the model untouched and the file of a run without the generations."""
    from lib_lora.library import Library
    from lib_lora.params import parse_prompt
    from lib_lora.runtime import Runtime
    from lib_lora.training.host import TrainingHost
    from lib_lora.training.jobs import JobRunner
    from train_support import make_dataset

    weights = torch.float16 if DEVICE == "cuda" else torch.float32
    tiny = _on_device(build_sd1(seed=0), weights)
    vae = tiny_vae().to(DEVICE, weights)
    data = make_dataset(tmp_path / "data", n=4, repeats=1)
    before = snapshot(tiny.unet, *[te for _, te in tiny.text_encoders])

    class Host(TrainingHost):
        def __init__(self, out, at):
            self.out, self.at, self.job, self.applied = out, set(at), None, []
            self.runtime = Runtime(Library([out]))
            self.runtime.set_model(ModelMap.build("sd1", tiny.unet, tiny.text_encoders))

        def family(self):
            return "sd1"

        def output_dir(self):
            return self.out

        def build_model(self, job):
            self.job = job
            return trainable(tiny, vae, device=DEVICE)

        def live_registry(self):
            return self.runtime.live

        def yield_interval(self):
            return 0.0 if self.at else None

        def generation_waiting(self):
            return self.job.step in self.at and self.job.step not in [s for s, _ in self.applied]

        def yield_lock(self, job):
            res = self.runtime.activate(parse_prompt("<lora:zkx@live:1>")[1])
            merged = not same(before, snapshot(tiny.unet, *[te for _, te in tiny.text_encoders]))
            self.runtime.restore()
            self.applied.append((job.step, (res.applied, merged)))

    body = {"output_name": "zkx", "dataset": {"train_dir": str(data), "resolution": 64, "enable_buckets": False},
            "network": {"rank": 4, "alpha": 4, "train_text_encoder": True}, "max_train_epochs": None,
            "max_train_steps": 4, "learning_rate": 1e-2, "min_snr_gamma": None, "save_precision": "fp16",
            "mixed_precision": "fp16" if DEVICE == "cuda" else "no"}
    ends = []
    for out, at in ((tmp_path / "mixed", (1, 2, 3)), (tmp_path / "plain", ())):
        host = Host(out, at)
        job = JobRunner(host).start(body)
        assert job.wait(300) and job.state == "finished", (job.error, list(job.logs))
        assert job.model_untouched is True
        ends.append((load_safetensors(job.output)[0], job.losses, host.applied))
    (mixed, mixed_losses, applied), (plain, plain_losses, _) = ends
    assert [a for _, a in applied] == [(["zkx@live"], True)] * 3
    assert mixed.keys() == plain.keys() and all(torch.equal(mixed[k], plain[k]) for k in mixed)
    assert mixed_losses == plain_losses
    assert same(before, snapshot(tiny.unet, *[te for _, te in tiny.text_encoders]))
