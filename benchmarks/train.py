"""Seconds per training step and peak memory on a full-size SD1.5 (or SDXL) layout, random weights.

    .venv/bin/python benchmarks/train.py [--latent 32] [--steps 4] [--rank 16] [--rounds 3] [--variants ours,reference]
    python benchmarks/train.py --device cuda --precision fp16 --latent 64 --batch 4 --steps 12 --rounds 2
    python benchmarks/train.py --device cuda --family sdxl --latent 128 --batch 1 --variants ours,reference,bare

Each variant runs in its own process so peak RSS is its own:
  ours       LoRA Workshop's Trainer (LoRA on the LDM/SGM UNet's transformer blocks, cached latents
             and text, AdamW), timed between progress callbacks after the caches are filled;
             its defaults (lean frozen layers: frozen_layers.lean_by_default)
  ours-plain the same with lean_frozen_layers=False
  ours-lean  the same with lean_frozen_layers=True (of the two, the one that is ours runs only when named)
  ours-no-L  the same with one of our step's levers L turned off (LEVERS below): what each lever saves
  reference  the diffusers example recipe: UNet2DConditionModel + peft LoraConfig on the
             same layers, AdamW, MSE on epsilon, the gradient clipped as the example clips it
             (both clip at ``--max-grad-norm``, 1.0 by default as in both recipes; 0: neither)
  bare       one forward+backward of the frozen LDM/SGM UNet (gradient w.r.t. the input only):
             the floor any LoRA step pays
Each variant runs ``--rounds`` times for time, the variants interleaved (a shared VM drifts by
5-10% over minutes), then once more for memory; the two runs differ in the allocator:
  time    glibc as a WebUI or CLI process has it (dynamic mmap threshold: freed tensors up to
          32 MiB are reused from the heap);
  memory  peak RSS growth during the steps over the RSS after building the model, with glibc's
          mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so that freed large tensors go back to
          the OS and RSS follows live tensor memory.  Every large allocation then page-faults
          afresh, so the step times of this run are printed too, but not used for the ratio.
Minor page faults per step are printed for both.  On CPU the CPU time of the stepping thread is
printed beside the wall time: with ``--threads 1`` it is the step's own work, which other
processes on a shared machine disturb far less than the wall clock.

On CUDA (``--device cuda``) every variant holds the UNet as the WebUI does, in ``--precision``
(fp16/bf16 weights, autocast in that type, loss scaling for fp16; the reference keeps its LoRA
parameters in fp32 as diffusers' ``cast_training_params`` does).  Steps are timed to a
synchronised end, and memory is the peak of torch's CUDA allocator over what the model itself
holds, taken in the timed runs.  After its timed steps each run profiles ``--kernel-steps`` more
and reports the GPU's busy time per step (the sum of its kernels, copies and fills): wall over
kernel time is what the host's per-op overhead costs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import step_clock  # benchmarks/step_clock.py: the clocks and the process per variant

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CONTEXT_DIM = {"sd1": 768, "sdxl": 2048}
SDXL_ADM = 2816      # SDXL's vector conditioning: pooled text (1280) + six size/crop embeddings (6 x 256)


def _inputs(args):
    """Latents, timesteps, text context and (SDXL) the vector conditioning, the same for every variant."""
    import torch
    g = torch.Generator().manual_seed(0)
    b, dev = args["batch"], args["device"]
    x = torch.randn(b, 4, args["latent"], args["latent"], generator=g).to(dev)
    ctx = torch.randn(b, 77, CONTEXT_DIM[args["family"]], generator=g).to(dev, _weights(args))
    t = torch.full((b,), 500, device=dev)
    y = torch.randn(b, SDXL_ADM, generator=g).to(dev, _weights(args)) if args["family"] == "sdxl" else None
    return x, t, ctx, y


def _weights(args):
    """The dtype the host holds the UNet in: fp32 on CPU, the half type on a GPU."""
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args["precision"], torch.float32)


def _amp(args):
    import torch
    on = args["device"] == "cuda" and args["precision"] != "fp32"
    return torch.autocast("cuda", dtype=_weights(args), enabled=on)


def _ldm_unet(args):
    """SD1.5's LDM UNet or SDXL's SGM UNet in the held dtype; at another ``--width`` the same layers, narrower."""
    import torch
    sys.path.insert(0, str(ROOT))
    from lib_lora.architectures import SD1_UNET, SDXL_UNET
    with torch.device(args["device"]):
        if args["family"] == "sdxl":
            from lib_lora.hosts.cli.sdxl_unet import SDXLUNetModel
            unet = SDXLUNetModel(**{**SDXL_UNET, "model_channels": args["width"]})
        else:
            from ldm.modules.diffusionmodules.openaimodel import UNetModel
            unet = UNetModel(**{**SD1_UNET, "model_channels": args["width"]})
    unet = unet.to(_weights(args))
    unet.dtype = _weights(args)    # ldm's use_fp16, as the WebUI sets it for a half model
    return unet


def _hooks() -> None:
    from lib_lora.training.network import TrainingNetwork
    TrainingNetwork.one_forward = False


def _unfused_adamw() -> None:
    from lib_lora.training import optim
    optim.adamw_kernel = lambda groups: {}


def _per_tensor_adamw() -> None:
    from lib_lora.training import optim
    optim.FLAT_GROUPS = ()


def _grads_returned() -> None:
    from lib_lora.training import lora_layers
    lora_layers.GRADS_IN_PLACE = False


def _pointwise_beside() -> None:
    from lib_lora.training import lora_layers
    lora_layers.BATCHED_POINTWISE = False


# what each ``ours-no-LEVER`` variant turns off in its process: (what that leaves, how)
LEVERS = {
    "one-forward": ("a forward hook per LoRA'd layer, the LoRA's own modules beside it", _hooks),
    "fused-adamw": ("torch's default AdamW kernels (one tensor at a time on CPU, foreach on CUDA)", _unfused_adamw),
    "flat-params": ("AdamW, zero_grad and the clip over each LoRA tensor, not one flat buffer", _per_tensor_adamw),
    "grads-in-place": ("the LoRA's gradients returned to autograd, which adds them into the flat buffer",
                       _grads_returned),
    "batched-pointwise": ("a batch through a 1x1 conv (SD1.5's proj_in/out) by the conv, the LoRA's modules beside it",
                          _pointwise_beside),
}


def run_ours(args, q):
    """The real Trainer loop (dataset, cached latents/text, LoRA, AdamW) on the LDM/SGM UNet."""
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

    for lever in args.get("off", ()):
        LEVERS[lever][1]()
    side, dev, dtype = args["latent"] * 8, args["device"], _weights(args)
    root = Path(tempfile.mkdtemp())
    (root / "data" / "1_bench").mkdir(parents=True)
    for i in range(2 * args["batch"]):   # two steps per epoch
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            root / "data" / "1_bench" / f"{i}.png")
    unet = _ldm_unet(args)
    _, _, ctx, y = _inputs(args)
    ctx, y = ctx[:1], (y[:1] if y is not None else None)
    proj = torch.nn.Conv2d(3, 4, 8, stride=8).to(dev, dtype)  # stands in for the VAE: latents are cached after epoch 1
    model = TrainableModel(args["family"], unet, [],
                           lambda caps, sizes=None: Conditioning(ctx.expand(len(caps), -1, -1),
                                                                 None if y is None else y.expand(len(caps), -1)),
                           lambda px: proj(px.to(dtype)), torch.linspace(0.9999, 0.005, 1000),
                           context=lambda: sdpa_attention(unet), device=torch.device(dev))
    steps = args["steps"]
    clock = step_clock.KernelClock(args)
    cfg = TrainConfig(DatasetConfig(root / "data", resolution=side, min_bucket_reso=side, max_bucket_reso=side,
                                    enable_buckets=False),
                      NetworkConfig(rank=args["rank"], alpha=args["rank"], train_text_encoder=False),
                      output_dir=root, output_name="bench", learning_rate=1e-4,
                      max_train_steps=2 + steps + (args["kernel_steps"] if clock.on else 0),
                      max_grad_norm=args["max_grad_norm"], lean_frozen_layers=args.get("lean"),
                      batch_size=args["batch"],
                      mixed_precision="no" if args["precision"] == "fp32" else args["precision"])
    # torch.optim's first step imports its compiler support, a large one-time RSS growth: done here, before
    # the memory window opens, as the reference builds its optimiser before its window
    from lib_lora.training.optim import adamw_kernel
    warm = torch.nn.Parameter(torch.zeros(1, device=dev))
    warm.grad = torch.zeros_like(warm)
    torch.optim.AdamW([warm], **adamw_kernel([{"params": [warm]}])).step()
    stamps = []
    base, floor = step_clock.current_rss_mb(), step_clock.cuda_mark(args)

    def progress(p) -> None:
        if dev == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), time.thread_time(), step_clock.minor_faults()))
        if p.step == 2 + steps:   # the timed steps are done: their peak, then the kernel clock
            stamps.append(step_clock.cuda_peak_mb(floor) if dev == "cuda" else step_clock.rss_mb() - base)
            clock.start()
        elif p.step == p.total and clock.on:
            stamps.append(clock.stop(args["kernel_steps"]))

    Trainer(model, make_plan(cfg, log=lambda s: None), Callbacks(on_progress=progress, log=lambda s: None)).run()
    timed = stamps[2:2 + steps]  # after the epoch that fills the caches
    wall, cpu, faults = ([b[i] - a[i] for a, b in zip(timed, timed[1:])] for i in range(3))
    from lib_lora.fileio import load_safetensors
    sd, _ = load_safetensors(root / "bench.safetensors")
    trainable = sum(v.numel() for k, v in sd.items() if not k.endswith("alpha"))
    q.put({"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "faults": statistics.median(faults),
           "peak_mb": stamps[2 + steps], "kernel_s": stamps[-1] if clock.on else float("nan"),
           "trainable": trainable})


def _diffusers_unet(args):
    """diffusers' UNet2DConditionModel with the same layers as ``_ldm_unet``."""
    from diffusers import UNet2DConditionModel
    w = args["width"]
    if args["family"] == "sdxl":
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(w, 2 * w, 4 * w), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(w // 64, 2 * w // 64, 4 * w // 64),    # diffusers' name for the head count here
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=SDXL_ADM)
    return UNet2DConditionModel(block_out_channels=(w, 2 * w, 4 * w, 4 * w), cross_attention_dim=768,
                                attention_head_dim=8)


def run_reference(args, q):
    """The diffusers text-to-image LoRA example's step: UNet2DConditionModel + peft, AdamW, MSE on epsilon."""
    import torch
    torch.set_num_threads(args["threads"])
    from peft import LoraConfig

    with torch.device(args["device"]):
        unet = _diffusers_unet(args)
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
    x, t, ctx, y = _inputs(args)
    # SDXL's vector conditioning, split as diffusers takes it
    added = None if y is None else {"text_embeds": y[:, :1280], "time_ids": y[:, 1280:1286].float()}

    def step():
        noise = torch.randn_like(x)
        with _amp(args):
            pred = unet((x + noise).to(_weights(args)), t, ctx, added_cond_kwargs=added).sample
        scaler.scale(torch.nn.functional.mse_loss(pred.float(), noise)).backward()
        if args["max_grad_norm"]:    # the example's accelerator.clip_grad_norm_: unscale, then torch's clip
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args["max_grad_norm"])
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    q.put({**step_clock.timed_steps(step, args), "trainable": sum(p.numel() for p in params)})


def _grad_scaler(args):
    import torch
    return torch.amp.GradScaler("cuda", enabled=args["device"] == "cuda" and args["precision"] == "fp16")


def run_bare(args, q):
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(args["threads"])
    from lib_lora.hosts.cli.attention import sdpa_attention

    unet = _ldm_unet(args)
    unet.requires_grad_(False)
    attention = sdpa_attention(unet)  # keep a reference: a dropped context manager exits at once
    attention.__enter__()
    x, t, ctx, y = _inputs(args)
    extra = {} if y is None else {"y": y}

    def step():
        xi = (x + torch.randn_like(x)).to(_weights(args)).requires_grad_(True)
        with _amp(args):
            out = unet(xi, t, context=ctx, **extra)
        out.float().square().mean().backward()

    q.put({**step_clock.timed_steps(step, args), "trainable": 0})


def _variants():
    """(name, runner, extra args) of every variant."""
    return [("ours", run_ours, {}), ("ours-plain", run_ours, {"lean": False}),
            ("ours-lean", run_ours, {"lean": True}),
            *[(f"ours-no-{k}", run_ours, {"off": [k]}) for k in LEVERS],
            ("reference", run_reference, {}), ("bare", run_bare, {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"), help="SD1.5's LDM UNet or SDXL's SGM UNet")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=320,
                    help="UNet base channels; e.g. --width 32 --latent 8 --threads 1 keeps SD1.5's layers but makes "
                         "the step bound by per-op overhead on CPU, as a GPU step at SD sizes is")
    ap.add_argument("--max-grad-norm", type=float, default=1.0,
                    help="gradient clipping of ours and the reference: 1.0 is the default of ours, sd-scripts and "
                         "the diffusers example; 0 clips nothing")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                    help="weights and autocast type (default: fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed runs per variant, interleaved, so that a drifting machine affects all alike")
    ap.add_argument("--kernel-steps", type=int, default=3, help="CUDA: steps profiled for the GPU's busy time")
    ap.add_argument("--variants", help="comma-separated subset of ours, ours-plain, ours-lean, "
                    + ", ".join(f"ours-no-{k}" for k in LEVERS) + ", reference, bare "
                    "(default: all but the one of ours-plain and ours-lean that ours is on this device)")
    args = vars(ap.parse_args())
    args["precision"] = args["precision"] or ("fp16" if args["device"] == "cuda" else "fp32")
    if args["device"] == "cpu" and args["precision"] != "fp32":
        ap.error("CPU runs in fp32 (autocast is a GPU path here)")
    if args["family"] == "sdxl" and args["width"] % 64:
        ap.error("SDXL's heads are 64 channels wide: --width must be a multiple of 64")
    cuda = args["device"] == "cuda"
    all_variants = _variants()
    sys.path.insert(0, str(ROOT))
    import torch
    from lib_lora.training.frozen_layers import lean_by_default
    lean = lean_by_default(torch.device(args["device"]), _ldm_unet({**args, "device": "meta"}))
    same_as_ours = "ours-lean" if lean else "ours-plain"
    chosen = (args.pop("variants") or ",".join(v[0] for v in all_variants if v[0] != same_as_ours)).split(",")
    unknown = set(chosen) - {v[0] for v in all_variants}
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    rounds = args.pop("rounds")
    variants = [v for v in all_variants if v[0] in chosen]
    timed: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for i in range(rounds):
        for name, fn, extra in variants:
            timed[name].append(step_clock.measure(fn, {**args, **extra}, pinned=False))
            r = timed[name][-1]
            print(f"round {i + 1} {name}: {r['step_s']:.3f} s/step, cpu {r['cpu_s']:.3f} s"
                  + (f", kernels {r['kernel_s']:.3f} s" if cuda else ""), flush=True)
    res = {}
    nan = float("nan")
    for name, fn, extra in variants:
        runs = timed[name]
        # CUDA memory is the allocator's own count: the timed runs already measured it
        m = {"peak_mb": max(r["peak_mb"] for r in runs), "step_s": nan, "faults": nan} if cuda \
            else step_clock.measure(fn, {**args, **extra}, pinned=True)
        res[name] = {"step_s": statistics.median(r["step_s"] for r in runs), "runs": [r["step_s"] for r in runs],
                     "cpu_s": statistics.median(r["cpu_s"] for r in runs), "cpu_runs": [r["cpu_s"] for r in runs],
                     "kernel_s": statistics.median(r["kernel_s"] for r in runs),
                     "faults": statistics.median(r["faults"] for r in runs), "peak_mb": m["peak_mb"],
                     "pinned_step_s": m["step_s"], "pinned_faults": m["faults"], "trainable": runs[0]["trainable"]}
        print(name, json.dumps(res[name]), flush=True)
    report(res, args, rounds)


def report(res: dict, args: dict, rounds: int) -> None:
    cuda = args["device"] == "cuda"
    where = f"{args['device']} {args['precision']}" + ("" if cuda else f", {args['threads']} threads") + \
        ("" if args["width"] == 320 else f", width {args['width']}")
    layout = {"sd1": "SD1.5", "sdxl": "SDXL"}[args["family"]]
    print(f"\n{layout} layout, latent {args['latent']}x{args['latent']}, batch {args['batch']}, rank {args['rank']}, "
          f"{where}, max_grad_norm {args['max_grad_norm']:g}; s/step: median of {rounds} runs"
          f" (each the median of {args['steps'] - 1} "
          f"steps after the first)")
    if cuda:
        print(f"{'variant':<22} {'s/step':>7} {'kernels':>8} {'wall/kern':>9} {'peak MiB':>9} | {'trainable':>9}")
        for k, v in res.items():
            print(f"{k:<22} {v['step_s']:7.3f} {v['kernel_s']:8.3f} {v['step_s'] / v['kernel_s']:9.2f} "
                  f"{v['peak_mb']:9.0f} | {v['trainable']:9d}")
    else:
        print(f"{'variant':<22} {'s/step':>7} {'cpu s':>7} {'faults':>7} | {'peak MiB':>8} {'s/step':>7} "
              f"{'faults':>7} | {'trainable':>9}")
        print(f"{'':<22} {'glibc default':>23} | {'mmap threshold pinned':>24} |")
        for k, v in res.items():
            print(f"{k:<22} {v['step_s']:7.3f} {v['cpu_s']:7.3f} {v['faults']:7.0f} | {v['peak_mb']:8.0f} "
                  f"{v['pinned_step_s']:7.3f} {v['pinned_faults']:7.0f} | {v['trainable']:9d}")
    if "ours" not in res:
        return
    o = res["ours"]
    clock = "wall" if cuda else "cpu"

    def ratio(a: dict, b: dict) -> str:
        per = [x / y for x, y in zip(a["runs"], b["runs"])]
        text = f"wall {a['step_s'] / b['step_s']:.2f}x (per round {', '.join(f'{x:.2f}' for x in per)})"
        if not cuda:
            per = [x / y for x, y in zip(a["cpu_runs"], b["cpu_runs"])]
            text += f", cpu {a['cpu_s'] / b['cpu_s']:.2f}x (per round {', '.join(f'{x:.2f}' for x in per)})"
        return text

    print()
    for name in res:
        if name.startswith("ours-"):
            print(f"{name}/ours: {ratio(res[name], o)}")
    if "reference" in res:
        r = res["reference"]
        print(f"ours/reference time: {ratio(o, r)}; target <= {0.5 if cuda else 0.6} ({clock})")
        print(f"ours/reference memory {o['peak_mb'] / max(r['peak_mb'], 1):.2f}x (target <= 1.0)")
        if not cuda:
            print(f"  with the pinned threshold: time {o['pinned_step_s'] / r['pinned_step_s']:.2f}x")
    if "bare" in res:
        print(f"ours/bare forward+backward: {ratio(o, res['bare'])}; target <= 1.2 ({clock})")
    if cuda:
        print(f"ours wall/kernel time {o['step_s'] / o['kernel_s']:.2f}x (target <= 1.3)")


if __name__ == "__main__":
    main()
