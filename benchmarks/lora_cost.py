"""Where a LoRA step's time goes beyond the frozen UNet's forward+backward, measured in one process.

    .venv/bin/python benchmarks/lora_cost.py [--width 32 --latent 8 --rank 16 --threads 1 --steps 12 --rounds 6]

The UNet of ``benchmarks/train.py`` (SD1.5's LDM layout, random weights, SDPA attention) with our
LoRA'd forward (``lora_layers.py``) on one group of the layers the trainer targets at a time, the
LoRA's tensors flattened into one buffer as the trainer's optimiser flattens them (so the backward
adds their gradients in place, as in a run).  Each group's forward and backward with a step's MSE
loss are timed by the thread's CPU clock, the groups interleaved over ``--rounds``:

  none        the frozen UNet (its input needs a gradient): ``bare`` of benchmarks/train.py
  kv-cross    the cross-attentions' to_k/to_v, which read the 768-wide text context at any width:
              without a LoRA they have no backward at all, since the context and weights are frozen
  other       every other LoRA'd layer
  all         all of them: the LoRA'd forward+backward of a training step
  (with ``--by-kind`` also each kind of the other layers on its own: attn1_to_q, ..., ff_net_2; these
  are not additive: 16 layers of one kind cost more per layer than the 160 together)

Then each LoRA'd layer alone at its own input shape, many times over (caches hot: what a
per-layer microbenchmark sees), and the update after the backward (clip at 1.0, AdamW as the
trainer builds it, zeroing) on the flat buffer.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import train  # benchmarks/train.py: the UNet and inputs every variant there uses

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("none", "kv-cross", "other", "all")
KINDS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_out_0",
         "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2")


def _group(key: str) -> str:
    return "kv-cross" if "attn2_to_k" in key or "attn2_to_v" in key else "other"


def _kind(key: str) -> str:
    return next(k for k in KINDS + ("attn2_to_k", "attn2_to_v") if key.endswith(k))


def _attach(net, keys) -> list:
    from lib_lora.training.lora_layers import lora_forward
    mods = [net.targets[k].module for k in keys]
    for k, m in zip(keys, mods):
        m.forward = types.MethodType(lora_forward(m, net.lora(k)), m)
    return mods


def _detach(mods) -> None:
    for m in mods:
        del m.forward


def _step(unet, x, t, ctx, noise):
    """(forward s, backward s) of one step's forward+backward."""
    import torch
    c0 = time.thread_time()
    pred = unet(x.detach().requires_grad_(True), t, context=ctx)
    loss = torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)).sum()
    c1 = time.thread_time()
    loss.backward()
    return c1 - c0, time.thread_time() - c1


def _alone(layer, shape, needs_grad: bool, reps: int = 20, runs: int = 15) -> float:
    """Seconds of one forward+backward of ``layer`` alone at input ``shape`` (median of ``runs``)."""
    import torch
    x = torch.randn(shape)
    g, times = None, []
    for _ in range(runs):
        c0 = time.thread_time()
        outs = [layer(x.detach().requires_grad_(needs_grad)) for _ in range(reps)]
        g = torch.randn_like(outs[0]) if g is None else g
        if outs[0].requires_grad:
            torch.autograd.backward(outs, [g] * reps)
        times.append((time.thread_time() - c0) / reps)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="steps per group and round (the first is not counted)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--by-kind", action="store_true", help="also time each kind of the other layers on its own")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(a.threads)
    from lib_lora.hosts.cli.attention import sdpa_attention
    from lib_lora.modelmap import ModelMap
    from lib_lora.training import flat_params
    from lib_lora.training.network import NetworkConfig, TrainingNetwork
    from lib_lora.training.optim import adamw_kernel

    args = {"family": "sd1", "latent": a.latent, "width": a.width, "device": "cpu", "precision": "fp32", "batch": 1}
    unet = train._ldm_unet(args).eval().requires_grad_(False)
    x, t, ctx, _ = train._inputs(args)
    noise = torch.randn_like(x)
    net = TrainingNetwork(ModelMap.build("sd1", unet, []),
                          NetworkConfig(rank=a.rank, alpha=a.rank, train_text_encoder=False))
    flat = flat_params.flatten([p for g in net.param_groups(1e-4, 1e-4) for p in g["params"]])
    keys = {"none": [], "all": list(net.targets)}
    for k in net.targets:
        keys.setdefault(_group(k), []).append(k)
        if a.by_kind and _group(k) == "other":
            keys.setdefault(_kind(k), []).append(k)
    groups = GROUPS + (KINDS if a.by_kind else ())
    shapes: dict[str, tuple] = {}
    times = {g: ([], []) for g in groups}
    with sdpa_attention(unet):
        def seen(key):
            def hook(module, inputs) -> None:
                shapes.setdefault(key, (tuple(inputs[0].shape), inputs[0].requires_grad))
            return hook
        hooks = [net.targets[k].module.register_forward_pre_hook(seen(k)) for k in net.targets]
        _step(unet, x, t, ctx, noise)       # the frozen model: which inputs need a gradient without a LoRA
        for h in hooks:
            h.remove()
        for _ in range(a.rounds):
            for g in groups:
                mods = _attach(net, keys[g])
                runs = [_step(unet, x, t, ctx, noise) for _ in range(a.steps)][1:]
                _detach(mods)
                flat.grad.zero_()
                times[g][0].append(statistics.median(r[0] for r in runs))
                times[g][1].append(statistics.median(r[1] for r in runs))
    alone = {g: 0.0 for g in groups}
    for k, (shape, needs) in shapes.items():
        m = net.targets[k].module
        frozen = _alone(m, shape, needs)
        mods = _attach(net, [k])
        lora = _alone(m, shape, needs)
        _detach(mods)
        alone[_group(k)] += lora - frozen
        if a.by_kind and _group(k) == "other":
            alone[_kind(k)] += lora - frozen
    alone["all"] = alone["kv-cross"] + alone["other"]
    flat.grad.normal_()
    opt = torch.optim.AdamW([flat], lr=1e-4, **adamw_kernel([{"params": [flat]}]))
    upd = []
    for _ in range(30):
        c0 = time.thread_time()
        torch.nn.utils.clip_grad_norm_([flat], 1.0)
        opt.step()
        flat.grad.zero_()
        upd.append(time.thread_time() - c0)
        flat.grad.normal_()

    print(f"SD1.5 layout, width {a.width}, latent {a.latent}, rank {a.rank}, {a.threads} thread(s); CPU ms of the "
          f"thread, median over {a.rounds} interleaved rounds of {a.steps - 1} steps")
    print(f"{'group':<14} {'layers':>6} {'fwd':>7} {'bwd':>7} {'total':>7} {'+ vs none':>9} {'µs/layer':>8} "
          f"{'alone µs/layer':>14}   totals per round")
    base = [f + b for f, b in zip(*times["none"])]
    for g in groups:
        f, b = (statistics.median(v) * 1e3 for v in times[g])
        tot = [x + y for x, y in zip(*times[g])]
        extra = statistics.median(x - y for x, y in zip(tot, base)) * 1e3
        n = len(keys[g])
        per = f"{extra / n * 1e3:8.1f} {alone[g] / n * 1e6:14.1f}" if n else f"{'':8} {'':14}"
        print(f"{g:<14} {n:6d} {f:7.2f} {b:7.2f} {f + b:7.2f} {extra:9.2f} {per}   "
              + " ".join(f"{x * 1e3:.1f}" for x in tot))
    print(f"update (clip, AdamW on {flat.numel()} values, zeroing): {statistics.median(upd[3:]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
