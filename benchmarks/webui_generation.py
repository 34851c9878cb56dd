"""What LoRA Workshop adds to a generation in a real WebUI, against the built-in Lora alone.

    WEBUI_DIR=/path/to/stable-diffusion-webui .venv/bin/python benchmarks/webui_generation.py [--repeat 7]

Starts the WebUI (offline, CPU, a tiny SD1 checkpoint; see tests/webui_server.py) three ways:
``builtin`` (this extension not installed), ``ours+builtin`` (installed, built-in enabled) and
``ours`` (built-in disabled).  Each server times txt2img (64 px, 4 Euler steps) over its API for:

- ``none``: a prompt without LoRAs;
- ``same``: the same LoRA and weight as the generation before;
- ``new``: another LoRA file than the generation before (two files alternate);
- ``weights``: the same LoRA with another weight than before (0.5 and 1 alternate).

All three servers run at once and take turns request by request, scenarios interleaved round by
round, so drift hits every configuration alike.  Times are medians in ms; ratios are ours /
builtin (lower is better).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from webui_server import data_dir, running, tiny_checkpoint  # noqa: E402

CONFIGS = {"builtin": dict(extension=False, builtin_off=False),
           "ours+builtin": dict(extension=True, builtin_off=False),
           "ours": dict(extension=True, builtin_off=True)}
SCENARIOS = ("none", "same", "new", "weights")


def prompts(scenario: str, i: int) -> str:
    if scenario == "none":
        return "a photo"
    if scenario == "same":
        return "a photo <lora:bench_a:0.8>"
    if scenario == "new":
        return f"a photo <lora:{'bench_a' if i % 2 else 'bench_b'}:0.8>"
    return f"a photo <lora:bench_a:{0.5 if i % 2 else 1.0}>"


BODY = dict(negative_prompt="", seed=1234, steps=4, width=64, height=64, cfg_scale=3, sampler_name="Euler",
            batch_size=1, n_iter=1)


def txt2img(srv, prompt: str) -> float:
    t0 = time.perf_counter()
    status, res = srv.request("POST", "/sdapi/v1/txt2img", {**BODY, "prompt": prompt})
    if status != 200:
        raise SystemExit(f"txt2img failed ({status}): {res}\n{srv.log_tail()}")
    return (time.perf_counter() - t0) * 1000


def start(stack: contextlib.ExitStack, webui: Path, name: str, tmp: Path):
    data = tmp / name
    ckpt_dir, lora_dir = data_dir(data, **CONFIGS[name])
    ckpt, _ = tiny_checkpoint(ckpt_dir, lora_dir, "bench_a", more_loras=("bench_b",))
    ready = "/lora-workshop/v1/loras" if CONFIGS[name]["extension"] else "/sdapi/v1/sd-models"
    return stack.enter_context(running(webui, data, ckpt, ready=ready))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    webui = Path(os.environ.get("WEBUI_DIR") or "")
    if not (webui / "launch.py").is_file():
        raise SystemExit("set WEBUI_DIR to a prepared stable-diffusion-webui checkout (see README, Development)")
    with tempfile.TemporaryDirectory(prefix="bench-webui-") as tmp, contextlib.ExitStack() as stack:
        # all servers run at once and take turns, one request at a time: drift hits every config alike
        servers = {name: start(stack, webui, name, Path(tmp)) for name in args.configs}
        for srv in servers.values():
            for s in SCENARIOS:  # first loads, caches and first calls of every path
                for i in range(args.warmup):
                    txt2img(srv, prompts(s, i))
        times = {n: {s: [] for s in SCENARIOS} for n in servers}
        for r in range(args.repeat):
            for s in SCENARIOS:
                for name, srv in servers.items():
                    # the call before sets the scene: the same prompt for none/same, the other file
                    # or weight for new/weights
                    txt2img(srv, prompts(s, r + 1))
                    times[name][s].append(txt2img(srv, prompts(s, r)))
    med = {n: {s: statistics.median(v) for s, v in t.items()} for n, t in times.items()}
    print(f"\ntxt2img, 64 px, 4 steps, CPU; median of {args.repeat} (ms)")
    print(f"{'scenario':<10}" + "".join(f"{n:>15}" for n in med) +
          ("".join(f"{n + '/builtin':>22}" for n in med if n != "builtin") if "builtin" in med else ""))
    for s in SCENARIOS:
        row = f"{s:<10}" + "".join(f"{med[n][s]:>15.1f}" for n in med)
        if "builtin" in med:
            row += "".join(f"{med[n][s] / med['builtin'][s]:>21.2f}x" for n in med if n != "builtin")
        print(row)


if __name__ == "__main__":
    main()
