"""Seconds per training step and peak memory on a full-size SD1.5 layout (CPU, random weights).

    .venv/bin/python benchmarks/train.py [--latent 32] [--steps 3] [--rank 16]

Each variant runs in its own process so peak RSS is its own:
  ours       LoRA Workshop's Trainer step path (LoRA on the LDM UNet's transformer blocks)
  reference  the diffusers example recipe: UNet2DConditionModel + peft LoraConfig on the
             same layers, AdamW, MSE on epsilon
  bare       one forward+backward of the frozen LDM UNet (gradient w.r.t. the input only):
             the floor any LoRA step pays
Memory is peak RSS growth during the steps over the process's RSS after building the model.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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
    x = torch.randn(1, 4, args["latent"], args["latent"], generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    return x, t, ctx


def run_ours(args, q):
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(args["threads"])
    from lib_lora.architectures import build
    from lib_lora.attention import sdpa_attention
    from lib_lora.training.model import Conditioning, TrainableModel
    from lib_lora.training.network import NetworkConfig, TrainingNetwork

    parts = build("sd1", device="cpu")
    te = parts.text_encoders
    model = TrainableModel("sd1", parts.unet, te, lambda c, s=None: None, lambda p: p, torch.linspace(0.99, 0.01, 1000))
    for p in parts.unet.parameters():
        p.requires_grad_(False)
    net = TrainingNetwork(model.model_map, NetworkConfig(rank=args["rank"], alpha=args["rank"], train_text_encoder=False))
    net.attach()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t, ctx = _inputs(args)
    base = _current_rss_mb()
    times = []
    sdpa_attention(parts.unet).__enter__()  # what the CLI host does (the WebUI has its own optimisations)
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        noise = torch.randn_like(x)
        pred = model.predict(x + noise, t, Conditioning(ctx))
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    q.put({"step_s": statistics.median(times[1:] or times), "peak_mb": _rss_mb() - base,
           "trainable": sum(p.numel() for p in net.parameters())})


def run_reference(args, q):
    import torch
    torch.set_num_threads(args["threads"])
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args["rank"], lora_alpha=args["rank"], init_lora_weights="gaussian",
                                target_modules=list(TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, ctx = _inputs(args)
    base = _current_rss_mb()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        noise = torch.randn_like(x)
        pred = unet(x + noise, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    q.put({"step_s": statistics.median(times[1:] or times), "peak_mb": _rss_mb() - base,
           "trainable": sum(p.numel() for p in params)})


def run_bare(args, q):
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(args["threads"])
    from lib_lora.architectures import build

    from lib_lora.attention import sdpa_attention
    unet = build("sd1", device="cpu").unet
    unet.requires_grad_(False)
    sdpa_attention(unet).__enter__()
    x, t, ctx = _inputs(args)
    base = _current_rss_mb()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        xi = (x + torch.randn_like(x)).requires_grad_(True)
        unet(xi, t, context=ctx).square().mean().backward()
        times.append(time.perf_counter() - t0)
    q.put({"step_s": statistics.median(times[1:] or times), "peak_mb": _rss_mb() - base, "trainable": 0})


def measure(fn, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = vars(ap.parse_args())
    res = {name: measure(fn, args) for name, fn in (("ours", run_ours), ("reference", run_reference),
                                                    ("bare", run_bare))}
    print(f"SD1.5 layout, latent {args['latent']}x{args['latent']}, batch 1, rank {args['rank']}, "
          f"{args['threads']} threads, median of {args['steps'] - 1} steps after the first")
    print(f"{'variant':<10} {'s/step':>8} {'peak MiB':>9} {'trainable':>10}")
    for k, v in res.items():
        print(f"{k:<10} {v['step_s']:8.2f} {v['peak_mb']:9.0f} {v['trainable']:10d}")
    o, r, b = res["ours"], res["reference"], res["bare"]
    print(f"\nours/reference time {o['step_s'] / r['step_s']:.2f}x (target <= 0.8), "
          f"memory {o['peak_mb'] / max(r['peak_mb'], 1):.2f}x (target <= 0.8)")
    print(f"ours/bare forward+backward {o['step_s'] / b['step_s']:.2f}x (target <= 2.5)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
