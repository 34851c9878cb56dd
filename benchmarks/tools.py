"""Time and peak memory of the offline tools on full-size SD1.5 layouts (random weights).

    .venv/bin/python benchmarks/tools.py [--layers N] [--dir DIR] [--device cpu|cuda]

1. resize: a rank-128 LoRA on every layer kohya's LoRA trains (transformer-block linears and
   1x1 convs, CLIP attention/MLP), with a decaying singular spectrum, to rank 32;
2. extract: rank 64 from two fp16 single-file SD1.5 checkpoints (UNet + CLIP-L), the second the
   first plus a rank-16 change and noise on every layer.

Each tool runs in its own process under the default allocator, as a CLI run has it; "peak RSS"
is that process's high-water mark above its RSS just before the tool starts (imports and the
meta-device layout already done).  ``--layers N`` extracts only the first N layers (text
encoder first); all 264 take many minutes of CPU SVDs on 2 cores, seconds on a GPU.
Energy kept is the fraction of the deltas' squared Frobenius norm the output holds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib_lora.fileio import save_safetensors  # noqa: E402
from lib_lora.tools import layout as layouts  # noqa: E402
from lib_lora.tools.extract import targets  # noqa: E402
from lib_lora.tools.stream import StreamWriter  # noqa: E402


def make_lora(path: Path, rank: int, layers: int | None) -> None:
    lay = layouts.for_family("sd1")
    g = torch.Generator().manual_seed(0)
    decay = torch.exp(-torch.arange(rank) / (rank / 6))  # a trained LoRA's spectrum falls off; random ones do not
    sd = {}
    for layer in targets(lay, convs=False)[:layers]:
        out_f, rest = layer.shape[0], layer.shape[1:]
        down = torch.randn(rank, *rest, generator=g) / (torch.tensor(rest).prod() ** 0.5)
        up = torch.randn(out_f, rank, *([1] * len(rest[1:])), generator=g) * 0.01
        up *= decay.reshape(1, rank, *([1] * len(rest[1:])))
        sd.update({f"{layer.key}.lora_down.weight": down.half(), f"{layer.key}.lora_up.weight": up.half(),
                   f"{layer.key}.alpha": torch.tensor(float(rank)).half()})
    save_safetensors(sd, path, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                                "ss_base_model_version": "sd_v1"}, overwrite=True)


def make_checkpoints(base: Path, tuned: Path, layers: int | None) -> None:
    from lib_lora.architectures import build

    parts = build("sd1", "meta")
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in parts.unet.state_dict().items()}
    te = parts.text_encoders[0][1].state_dict()
    shapes |= {"cond_stage_model.transformer." + k: tuple(v.shape) for k, v in te.items() if "position_ids" not in k}
    lay = layouts.Layout.from_modules("sd1", parts.unet, parts.text_encoders)
    from lib_lora.hosts.cli.config import UNET_PREFIX
    changed = set()
    for layer in targets(lay, convs=False)[:layers]:  # the file keys the extract will read
        name = {id(m): n for n, m in (parts.unet.named_modules() if layer.component == "unet"
                                      else parts.text_encoders[0][1].named_modules())}[id(layer.target.module)]
        prefix = UNET_PREFIX if layer.component == "unet" else "cond_stage_model.transformer."
        changed.add(f"{prefix}{name}.weight")
    for path, tune in ((base, False), (tuned, True)):
        with StreamWriter(path, [(k, torch.float16, s) for k, s in shapes.items()], overwrite=True) as w:
            for k in w.order:
                g = torch.Generator().manual_seed(hash(k) % 2 ** 31)
                t = torch.randn(shapes[k], generator=g) * 0.02
                if tune and k in changed:
                    out_f = t.shape[0]
                    a = torch.randn(out_f, 16, generator=g)
                    b = torch.randn(16, t[0].numel(), generator=g)
                    t += (a @ b).reshape(t.shape) * 3e-3 + torch.randn(t.shape, generator=g) * 1e-4
                w.write(k, t.half())


def run_tool(tool: str, args: list[str]) -> dict:
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from lib_lora.tools import layout, resize, extract
layout.for_family("sd1")
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
t = time.perf_counter()
a = {args!r}
if {tool!r} == "resize":
    r = resize.resize(a[0], a[1], rank=32, force=True, device=a[2] or None, log=lambda s: None).result
else:
    r = extract.extract(a[0], a[1], a[2], rank=64, force=True, device=a[3] or None,
                        limit=int(a[4]) if a[4] else None, log=lambda s: None).result
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss": status("VmHWM:") - before,
                  "baseline_rss": before, "layers": len(r.layers), "energy_kept": r.kept}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="extract only the first N layers (default: all)")
    ap.add_argument("--dir", type=Path, default=None, help="where the generated files go (default: a temp dir)")
    ap.add_argument("--device", default="", help="SVD device (default: cuda when available)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    d = Path(tmp.name) if tmp else args.dir
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_lora(d / "r128.safetensors", 128, None)  # resize is quick: always every layer
    make_checkpoints(d / "base.safetensors", d / "tuned.safetensors", args.layers)
    print(f"inputs written in {time.perf_counter() - t:.0f} s: LoRA {(d / 'r128.safetensors').stat().st_size / 1e6:.0f} MB,"
          f" checkpoints {(d / 'base.safetensors').stat().st_size / 1e9:.2f} GB each")
    res = run_tool("resize", [str(d / "r128.safetensors"), str(d / "r32.safetensors"), args.device])
    print(f"resize 128 -> 32   {res['layers']:4d} layers  {res['seconds']:7.1f} s  peak RSS +{res['peak_rss'] / 1e6:6.0f} MB"
          f"  energy kept {100 * res['energy_kept']:.2f}%")
    res = run_tool("extract", [str(d / "base.safetensors"), str(d / "tuned.safetensors"), str(d / "x64.safetensors"),
                               args.device, str(args.layers or "")])
    print(f"extract rank 64    {res['layers']:4d} layers  {res['seconds']:7.1f} s  peak RSS +{res['peak_rss'] / 1e6:6.0f} MB"
          f"  energy kept {100 * res['energy_kept']:.2f}%")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
