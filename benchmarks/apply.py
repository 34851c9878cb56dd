"""Apply/switch/restore cost of LoRA merging on a full-size SD1.5 layout, against diffusers.

    .venv/bin/python benchmarks/apply.py [--ranks 16 128] [--repeat 3]
    .venv/bin/python benchmarks/apply.py --scheduled-only --ranks 16 [--clock cpu] [--hook-max-cost inf] [--device cuda]

Both sides get the same kohya-format files (every layer kohya's LoRA trains: the
transformer blocks' linears and 1x1 convs, CLIP attention and MLP). Ours merges into
the LDM UNet + HF CLIP the WebUI runs; the reference is diffusers' load_lora_weights +
fuse_lora / unfuse_lora + unload_lora_weights on the equivalent diffusers pipeline.
Random weights; timings are medians; ratios are ours / reference (lower is better).
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_lora.architectures import CLIP_L, SD1_UNET, build  # noqa: E402
from lib_lora.network import parse_state_dict  # noqa: E402
from lib_lora.params import LoraRequest  # noqa: E402
from lib_lora.patcher import Activation, Patcher  # noqa: E402

KOHYA_LORA_TARGETS = ("attn1_to", "attn2_to", "ff_net", "proj_in", "proj_out", "self_attn", "mlp_fc")


def kohya_file(mm, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for t in mm.targets:
        if not t.key.startswith(("lora_unet_down", "lora_unet_mid", "lora_unet_up", "lora_te_")):
            continue
        if not any(s in t.key for s in KOHYA_LORA_TARGETS):
            continue
        w = t.weight()
        extra = (1, 1) if w.dim() == 4 else ()
        sd[f"{t.key}.lora_down.weight"] = (torch.randn(rank, w.shape[1], *extra, generator=g) * 0.01).half()
        sd[f"{t.key}.lora_up.weight"] = (torch.randn(w.shape[0], rank, *extra, generator=g) * 0.01).half()
        sd[f"{t.key}.alpha"] = torch.tensor(rank / 2).half()
    return sd


CLOCK = time.perf_counter  # --clock cpu: this process's CPU time, which load from other processes leaves alone


def timed(fn, repeat: int, setup=None) -> float:
    """Median seconds of ``fn`` (``setup`` runs untimed before each call)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def diffusers_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=None,
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def steady_step(unet, x, t, ctx, n: int = 4) -> float:
    """Median seconds of consecutive UNet steps, the first one dropped, as in a sampling run.

    Timing single steps right after an apply/restore measured allocator after-effects of the
    merge (up to 1.4x on this CPU), not the merged weights, which are plain tensors of the same
    shapes: consecutive steps show no difference beyond noise."""
    unet_step_ldm(unet, x, t, ctx)
    return statistics.median(timed(lambda: unet_step_ldm(unet, x, t, ctx), 1) for _ in range(n - 1))


def sampling_steps(p, acts, unet, x, t, ctx, repeat: int) -> tuple[float, float]:
    """Median step time with ``acts`` merged and without, alternating so drift hits both alike."""
    merged, plain = [], []
    for _ in range(repeat):
        p.apply(acts)
        merged.append(steady_step(unet, x, t, ctx))
        p.restore()
        plain.append(steady_step(unet, x, t, ctx))
    return statistics.median(merged), statistics.median(plain)


def scheduled_steps(p, net, unet, x, t, ctx, repeat: int,
                    costs: list[float]) -> tuple[float, dict[float, tuple[float, float]]]:
    """Step time with ``net`` merged, and scheduled (start/stop, gate open) with the patcher's
    ``hook_max_cost`` at each of ``costs`` (inf: every layer a hook fits is hooked, 0: every layer
    merged while the gate is open).

    Measured in adjacent groups, so load from other processes hits every side of a group alike;
    returns (median merged s, {cost: (median scheduled s, median of the per-group ratios)})."""
    keep = p.hook_max_cost
    merged, sched = [], {c: [] for c in costs}
    for _ in range(repeat):
        p.apply([Activation(net, LoraRequest(net.name))])
        merged.append(steady_step(unet, x, t, ctx, n=3))
        p.restore()
        for c in costs:
            p.hook_max_cost = c
            p.apply([Activation(net, LoraRequest(net.name, stop=10 ** 6))])
            sched[c].append(steady_step(unet, x, t, ctx, n=3))
            p.restore()
    p.hook_max_cost = keep
    return statistics.median(merged), {
        c: (statistics.median(v), statistics.median(s / m for s, m in zip(v, merged))) for c, v in sched.items()}


def gate_flips(p, net, repeat: int) -> tuple[float, int, int]:
    """Median seconds of one open + close of a scheduled ``net``'s gate (the layers merged while it is
    open re-merge twice), and how many of its UNet layers are hooked / merged while open."""
    times = []
    for _ in range(repeat):
        p.apply([Activation(net, LoraRequest(net.name, start=1, stop=2))])
        t0 = CLOCK()
        p.set_step(1)
        p.set_step(2)
        times.append(CLOCK() - t0)
        hooked = len(p.bypass.terms)
        gated = sum(1 for lst in p._contribs.values() if any(g is not None for _, g in lst))
        p.restore()
    return statistics.median(times), hooked, gated


def unet_step_ldm(unet, x, t, ctx):
    # on CUDA under fp16 autocast, as the WebUI samples
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=x.is_cuda):
        unet(x, t, context=ctx)
    if x.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32, help="latent side for the sampling step (64 = 512px)")
    ap.add_argument("--sampling-only", action="store_true", help="only the merged-vs-plain sampling step")
    ap.add_argument("--scheduled-only", action="store_true",
                    help="only the sampling step with the LoRA scheduled (start/stop) vs merged, and a gate flip")
    ap.add_argument("--hook-max-cost", type=float, default=None,
                    help="the patcher's hook_max_cost for scheduled LoRAs (default: the patcher's; "
                         "inf: hook every layer a hook fits, 0: merge every layer while its gate is open)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time by this process's CPU time (with one thread on a shared CPU, the "
                         "wall clock also counts other processes' load)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    torch.manual_seed(0)

    parts = build("sd1", device=args.device)
    mm = parts.model_map()
    pipe = None if args.sampling_only or args.scheduled_only else diffusers_pipe()
    x = torch.randn(2, 4, args.latent, args.latent, device=args.device)
    t = torch.tensor([500, 500], device=args.device)
    ctx = torch.randn(2, 77, SD1_UNET["context_dim"], device=args.device)
    print(f"SD1.5 layout: UNet {sum(p.numel() for p in parts.unet.parameters()) / 1e6:.0f}M params, "
          f"latent {args.latent}x{args.latent}, batch 2, threads {torch.get_num_threads()}")

    rows = []
    for rank in args.ranks:
        a, b = kohya_file(mm, rank, 1), kohya_file(mm, rank, 2)
        na, nb = parse_state_dict("a", a, {}), parse_state_dict("b", b, {})
        p = Patcher(mm)
        if args.hook_max_cost is not None:
            p.hook_max_cost = args.hook_max_cost
        A, B = [Activation(na, LoraRequest(na.name))], [Activation(nb, LoraRequest(nb.name))]
        B_half = [Activation(nb, LoraRequest(nb.name, 0.5, 0.5))]
        if args.sampling_only:
            m, pl = sampling_steps(p, A, parts.unet, x, t, ctx, args.repeat)
            print(f"rank {rank}: sampling step merged {m:.3f}s, plain {pl:.3f}s, ratio {m / pl:.3f}")
            continue
        if args.scheduled_only:
            costs = [p.hook_max_cost] + ([math.inf] if p.hook_max_cost != math.inf else [])
            m, sched = scheduled_steps(p, na, parts.unet, x, t, ctx, args.repeat, costs)
            flip, n_hooked, n_gated = gate_flips(p, na, args.repeat)
            print(f"rank {rank}: sampling step merged {m:.3f}s; " + "; ".join(
                f"scheduled with hook_max_cost {c:g}{' (every layer hooked)' if c == math.inf else ''} "
                f"{s:.3f}s, median paired ratio {r:.3f}" for c, (s, r) in sched.items()))
            print(f"  at hook_max_cost {p.hook_max_cost:g}: UNet layers hooked {n_hooked}, merged while open "
                  f"{n_gated}; a gate's open + close {flip:.3f}s")
            continue
        ours = {
            "first apply": timed(lambda: p.apply(A), args.repeat, setup=p.restore),
            "switch": timed(lambda: p.apply(B), args.repeat, setup=lambda: p.apply(A)),
            "weight change": timed(lambda: p.apply(B_half), args.repeat, setup=lambda: p.apply(B)),
            "restore": timed(p.restore, args.repeat, setup=lambda: p.apply(A)),
        }
        step_merged, step_plain = sampling_steps(p, A, parts.unet, x, t, ctx, args.repeat)
        step_merged2, sched = scheduled_steps(p, na, parts.unet, x, t, ctx, args.repeat, [p.hook_max_cost])
        step_hooked = sched[p.hook_max_cost][0]
        p.apply(A)
        backup_mb = sum(s.original.numel() * s.original.element_size() for s in p.slots.values()) / 2**20
        n_slots = len(p.slots)
        p.restore()

        def ref_load(sd, scale=1.0):
            pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="x")
            pipe.fuse_lora(lora_scale=scale)

        def ref_unload():
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

        def ref_switch():
            ref_unload()
            ref_load(b)

        def ref_reweight():
            pipe.unfuse_lora()
            pipe.fuse_lora(lora_scale=0.5)

        ref = {"first apply": timed(lambda: ref_load(a), args.repeat, setup=ref_unload)}
        ref["switch"] = timed(ref_switch, args.repeat, setup=lambda: (ref_unload(), ref_load(a)))
        ref["weight change"] = timed(ref_reweight, args.repeat, setup=lambda: (pipe.unfuse_lora(), pipe.fuse_lora(lora_scale=1.0)))
        ref["restore"] = timed(ref_unload, args.repeat, setup=lambda: (ref_unload(), ref_load(a)))
        n_layers = len(na.adapters)
        for k in ("first apply", "switch", "weight change", "restore"):
            rows.append((rank, n_layers, k, ours[k], ref[k]))
        rows.append((rank, n_layers, "sampling step (merged vs none)", step_merged, step_plain))
        rows.append((rank, n_layers, "step, start/stop vs merged", step_hooked, step_merged2))
        print(f"rank {rank}: {n_layers} layers, originals kept: {backup_mb:.0f} MiB in {n_slots} tensors")

    print(f"\n{'rank':>5} {'layers':>6}  {'operation':<32} {'ours s':>9} {'reference s':>12} {'ratio':>7}")
    for rank, n, k, o, r in rows:
        print(f"{rank:>5} {n:>6}  {k:<32} {o:9.3f} {r:12.3f} {o / r if r else float('nan'):7.2f}")
    print("\nreference: diffusers load_lora_weights+fuse_lora / unfuse_lora+unload_lora_weights; "
          "sampling rows compare our merged UNet with the same UNet without LoRA, and the LoRA "
          "scheduled (start=/stop=: hooked or merged while open, per layer) with it merged.")


if __name__ == "__main__":
    main()
