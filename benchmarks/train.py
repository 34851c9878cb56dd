"""Seconds per training step and peak memory on a full-size SD1.5 layout (random weights).

    .venv/bin/python benchmarks/train.py [--latent 32] [--steps 4] [--rank 16] [--rounds 3] [--variants ours,reference]
    python benchmarks/train.py --device cuda --precision fp16 --latent 64 --batch 4 --steps 12 --rounds 2

Each variant runs in its own process so peak RSS is its own:
  ours       LoRA Workshop's Trainer (LoRA on the LDM UNet's transformer blocks, cached latents
             and text, AdamW), timed between progress callbacks after the caches are filled;
             its defaults: lean frozen layers on CPU, not on CUDA
  ours-plain the same with lean_frozen_layers=False: autograd's own conv/linear backward
  ours-lean  the same with lean_frozen_layers=True (a variant of its own on CUDA)
  reference  the diffusers example recipe: UNet2DConditionModel + peft LoraConfig on the
             same layers, AdamW, MSE on epsilon
  bare       one forward+backward of the frozen LDM UNet (gradient w.r.t. the input only):
             the floor any LoRA step pays
Each variant runs ``--rounds`` times for time, the variants interleaved (a shared VM drifts by
5-10% over minutes), then once more for memory; the two runs differ in the allocator:
  time    glibc as a WebUI or CLI process has it (dynamic mmap threshold: freed tensors up to
          32 MiB are reused from the heap);
  memory  peak RSS growth during the steps over the RSS after building the model, with glibc's
          mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so that freed large tensors go back to
          the OS and RSS follows live tensor memory.  Every large allocation then page-faults
          afresh, so the step times of this run are printed too, but not used for the ratio.
Minor page faults per step are printed for both.

On CUDA (``--device cuda``) every variant holds the UNet as the WebUI does, in ``--precision``
(fp16/bf16 weights, autocast in that type, loss scaling for fp16; the reference keeps its LoRA
parameters in fp32 as diffusers' ``cast_training_params`` does).  Steps are timed to a
synchronised end, and memory is the peak of torch's CUDA allocator over what the model itself
holds, taken in the timed runs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _inputs(args):
    import torch
    g = torch.Generator().manual_seed(0)
    b, dev = args["batch"], args["device"]
    x = torch.randn(b, 4, args["latent"], args["latent"], generator=g).to(dev)
    ctx = torch.randn(b, 77, 768, generator=g).to(dev, _weights(args))
    t = torch.full((b,), 500, device=dev)
    return x, t, ctx


def _weights(args):
    """The dtype the host holds the UNet in: fp32 on CPU, the half type on a GPU."""
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args["precision"], torch.float32)


def _amp(args):
    import torch
    on = args["device"] == "cuda" and args["precision"] != "fp32"
    return torch.autocast("cuda", dtype=_weights(args), enabled=on)


def _sd1(args):
    """SD1.5's UNet (and CLIP-L) in the held dtype; at another ``--width`` the same layers, narrower."""
    import torch
    from lib_lora.architectures import SD1_UNET, Parts, build
    if args["width"] == SD1_UNET["model_channels"]:
        return build("sd1", device=args["device"], dtype=_weights(args))
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device(args["device"]):
        unet = UNetModel(**{**SD1_UNET, "model_channels": args["width"]})
    return Parts("sd1", unet.to(_weights(args)), [])   # the text encoder is frozen and cached anyway


def _cuda_mark(args) -> int:
    """Start a peak-memory window on CUDA; the bytes allocated now are its floor."""
    import torch
    if args["device"] != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _cuda_peak_mb(floor: int) -> float:
    import torch
    return (torch.cuda.max_memory_allocated() - floor) / 2**20


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_steps(step, steps: int, args) -> dict:
    """Median seconds and minor faults of ``step()`` (after the first), peak memory growth in MiB."""
    import torch
    cuda = args["device"] == "cuda"
    base, floor = _current_rss_mb(), _cuda_mark(args)
    times, faults = [], []
    for _ in range(steps):
        t0, f0 = time.perf_counter(), _faults()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
    return {"step_s": statistics.median(times[1:] or times), "faults": statistics.median(faults[1:] or faults),
            "peak_mb": _cuda_peak_mb(floor) if cuda else _rss_mb() - base}


def run_ours(args, q):
    """The real Trainer loop (dataset, cached latents/text, LoRA hooks, AdamW) on the LDM UNet."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    import numpy as np
    import torch
    from PIL import Image
    torch.set_num_threads(args["threads"])
    from lib_lora.hosts.cli.attention import sdpa_attention
    from lib_lora.training.dataset import DatasetConfig
    from lib_lora.training.model import Conditioning, TrainableModel
    from lib_lora.training.network import NetworkConfig
    from lib_lora.training.config import TrainConfig
    from lib_lora.training.plan import make_plan
    from lib_lora.training.trainer import Callbacks, Trainer

    side, dev, dtype = args["latent"] * 8, args["device"], _weights(args)
    root = Path(tempfile.mkdtemp())
    (root / "data" / "1_bench").mkdir(parents=True)
    for i in range(2 * args["batch"]):   # two steps per epoch
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            root / "data" / "1_bench" / f"{i}.png")
    parts = _sd1(args)
    parts.unet.dtype = dtype    # ldm's use_fp16, as the WebUI sets it for a half model
    ctx = _inputs(args)[2][:1]
    proj = torch.nn.Conv2d(3, 4, 8, stride=8).to(dev, dtype)  # stands in for the VAE: latents are cached after epoch 1
    model = TrainableModel("sd1", parts.unet, parts.text_encoders,
                           lambda caps, sizes=None: Conditioning(ctx.expand(len(caps), -1, -1)),
                           lambda px: proj(px.to(dtype)), torch.linspace(0.9999, 0.005, 1000),
                           context=lambda: sdpa_attention(parts.unet), device=torch.device(dev))
    cfg = TrainConfig(DatasetConfig(root / "data", resolution=side, min_bucket_reso=side, max_bucket_reso=side,
                                    enable_buckets=False),
                      NetworkConfig(rank=args["rank"], alpha=args["rank"], train_text_encoder=False),
                      output_dir=root, output_name="bench", max_train_steps=args["steps"] + 2, learning_rate=1e-4,
                      max_grad_norm=0.0, lean_frozen_layers=args.get("lean"), batch_size=args["batch"],
                      mixed_precision="no" if args["precision"] == "fp32" else args["precision"])
    stamps = []
    base, floor = _current_rss_mb(), _cuda_mark(args)
    Trainer(model, make_plan(cfg, log=lambda s: None), Callbacks(on_progress=lambda p: stamps.append((time.perf_counter(), _faults())),
                                  log=lambda s: None)).run()
    stamps = stamps[2:]  # after the epoch that fills the caches
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    faults = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    from lib_lora.fileio import load_safetensors
    sd, _ = load_safetensors(root / "bench.safetensors")
    trainable = sum(v.numel() for k, v in sd.items() if not k.endswith("alpha"))
    peak = _cuda_peak_mb(floor) if dev == "cuda" else _rss_mb() - base
    q.put({"step_s": statistics.median(steps), "faults": statistics.median(faults), "peak_mb": peak,
           "trainable": trainable})


def run_reference(args, q):
    """The diffusers text-to-image LoRA example's step: UNet2DConditionModel + peft, AdamW, MSE on epsilon."""
    import torch
    torch.set_num_threads(args["threads"])
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device(args["device"]):
        w = args["width"]
        unet = UNet2DConditionModel(block_out_channels=(w, 2 * w, 4 * w, 4 * w), cross_attention_dim=768,
                                    attention_head_dim=8)
    unet.requires_grad_(False)
    if _weights(args) != torch.float32:
        unet.to(dtype=_weights(args))
    unet.add_adapter(LoraConfig(r=args["rank"], lora_alpha=args["rank"], init_lora_weights="gaussian",
                                target_modules=list(TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:     # diffusers' cast_training_params: trainable parameters in fp32
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = _grad_scaler(args)
    x, t, ctx = _inputs(args)

    def step():
        noise = torch.randn_like(x)
        with _amp(args):
            pred = unet((x + noise).to(_weights(args)), t, ctx).sample
        scaler.scale(torch.nn.functional.mse_loss(pred.float(), noise)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    q.put({**_timed_steps(step, args["steps"], args), "trainable": sum(p.numel() for p in params)})


def _grad_scaler(args):
    import torch
    return torch.amp.GradScaler("cuda", enabled=args["device"] == "cuda" and args["precision"] == "fp16")


def run_bare(args, q):
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(args["threads"])
    from lib_lora.hosts.cli.attention import sdpa_attention

    unet = _sd1(args).unet
    unet.dtype = _weights(args)
    unet.requires_grad_(False)
    attention = sdpa_attention(unet)  # keep a reference: a dropped context manager exits at once
    attention.__enter__()
    x, t, ctx = _inputs(args)

    def step():
        xi = (x + torch.randn_like(x)).to(_weights(args)).requires_grad_(True)
        with _amp(args):
            out = unet(xi, t, context=ctx)
        out.float().square().mean().backward()

    q.put({**_timed_steps(step, args["steps"], args), "trainable": 0})


def measure(fn, args, pinned: bool) -> dict:
    # glibc reads MALLOC_MMAP_THRESHOLD_ once, when the spawned interpreter starts
    env = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if pinned:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(args, q))
        p.start()
        out = q.get()
        p.join()
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if env is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=320,
                    help="UNet base channels; e.g. --width 32 --latent 8 --threads 1 keeps SD1.5's layers but makes "
                         "the step bound by per-op overhead on CPU, as a GPU step at SD sizes is")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                    help="weights and autocast type (default: fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed runs per variant, interleaved, so that a drifting machine affects all alike")
    ap.add_argument("--variants", help="comma-separated subset of ours, ours-plain, ours-lean, reference, bare "
                    "(default: all but ours-lean on CPU, all but ours-plain on CUDA, where ours is each one)")
    args = vars(ap.parse_args())
    args["precision"] = args["precision"] or ("fp16" if args["device"] == "cuda" else "fp32")
    if args["device"] == "cpu" and args["precision"] != "fp32":
        ap.error("CPU runs in fp32 (autocast is a GPU path here)")
    cuda = args["device"] == "cuda"
    chosen = (args.pop("variants") or f"ours,{'ours-lean' if cuda else 'ours-plain'},reference,bare").split(",")
    rounds = args.pop("rounds")
    variants = [v for v in (("ours", run_ours, {}), ("ours-plain", run_ours, {"lean": False}),
                            ("ours-lean", run_ours, {"lean": True}), ("reference", run_reference, {}),
                            ("bare", run_bare, {})) if v[0] in chosen]
    timed: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for i in range(rounds):
        for name, fn, extra in variants:
            timed[name].append(measure(fn, {**args, **extra}, pinned=False))
            print(f"round {i + 1} {name}: {timed[name][-1]['step_s']:.3f} s/step", flush=True)
    res = {}
    for name, fn, extra in variants:
        runs = timed[name]
        # CUDA memory is the allocator's own count: the timed runs already measured it
        m = {"peak_mb": max(r["peak_mb"] for r in runs), "step_s": float("nan"), "faults": float("nan")} if cuda \
            else measure(fn, {**args, **extra}, pinned=True)
        res[name] = {"step_s": statistics.median(r["step_s"] for r in runs), "runs": [r["step_s"] for r in runs],
                     "faults": statistics.median(r["faults"] for r in runs), "peak_mb": m["peak_mb"],
                     "pinned_step_s": m["step_s"], "pinned_faults": m["faults"], "trainable": runs[0]["trainable"]}
        print(name, json.dumps(res[name]), flush=True)
    where = f"{args['device']} {args['precision']}" + ("" if cuda else f", {args['threads']} threads") + \
        ("" if args["width"] == 320 else f", width {args['width']}")
    print(f"\nSD1.5 layout, latent {args['latent']}x{args['latent']}, batch {args['batch']}, rank {args['rank']}, "
          f"{where}; s/step: median of {rounds} runs (each the median of {args['steps'] - 1} "
          f"steps after the first)")
    print(f"{'variant':<10} {'s/step':>7} {'faults':>8} | {'peak MiB':>8} {'s/step':>7} {'faults':>8} | {'trainable':>9}")
    print(f"{'':<10} {'glibc default':>16} | {'mmap threshold pinned':>25} |")
    for k, v in res.items():
        print(f"{k:<10} {v['step_s']:7.3f} {v['faults']:8.0f} | {v['peak_mb']:8.0f} {v['pinned_step_s']:7.3f} "
              f"{v['pinned_faults']:8.0f} | {v['trainable']:9d}")
    if not {"ours", "reference", "bare"} <= set(res):
        return
    o, r, b = res["ours"], res["reference"], res["bare"]
    per_round = [a / c for a, c in zip(o["runs"], r["runs"])]
    print(f"\nours/reference time {o['step_s'] / r['step_s']:.2f}x (per round {', '.join(f'{x:.2f}' for x in per_round)}; "
          f"target <= 0.8), memory {o['peak_mb'] / max(r['peak_mb'], 1):.2f}x (target <= 0.8); "
          f"time with the pinned threshold {o['pinned_step_s'] / r['pinned_step_s']:.2f}x")
    print(f"ours/bare forward+backward {o['step_s'] / b['step_s']:.2f}x (target <= 2.5)")


if __name__ == "__main__":
    main()
