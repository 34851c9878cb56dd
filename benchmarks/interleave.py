"""What letting generations in between training steps costs when none comes: seconds per step of a
training job on the SD1.5 layout (random weights, as benchmarks/train.py builds it), three ways:

  off      the priority "training only": no step boundary work at all
  check    "generation first" with an interval of 0: at every step boundary the job looks for keep
           requests and asks the host whether anything waits for its lock (nothing does); the
           target is at most 1.02x ``off``
  suspend  the worst case of a yield without the generation itself: at every boundary the model is
           handed back as loaded (LoRA detached, flags/modes/contexts undone), the lock released and
           taken back, and training mode entered again

    .venv/bin/python benchmarks/interleave.py --width 32 --latent 8 --threads 1 --steps 12 --rounds 3
    python benchmarks/interleave.py --device cuda --precision fp16 --latent 64 --batch 4 --steps 20

Jobs run through the ``JobRunner`` (the WebUI's path) with the variants interleaved round by round in
one process; a step is the time between two progress callbacks, the first steps (the latent cache
filling) left out.  Times are medians.  Since a busy machine varies by more than 2% from step to
step, the work ``check`` adds is also timed on its own: a step boundary (``StepBoundary`` made, the
job's ``between_steps`` called, nothing waiting) repeated many times, as a fraction of the ``off`` step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"))
    args = vars(ap.parse_args())
    args["precision"] = args["precision"] or ("fp16" if args["device"] == "cuda" else "fp32")
    args["family"] = "sd1"  # the SD1.5 layout benchmarks/train.py builds

    import numpy as np
    import torch
    from PIL import Image

    import train as bench  # benchmarks/train.py: the same model and inputs
    from lib_lora.training.host import TrainingHost
    from lib_lora.training.jobs import JobRunner
    from lib_lora.training.model import Conditioning, TrainableModel

    torch.set_num_threads(args["threads"])
    side, dev, dtype = args["latent"] * 8, args["device"], bench._weights(args)
    root = Path(tempfile.mkdtemp())
    data = root / "data" / "1_bench"
    data.mkdir(parents=True)
    for i in range(2 * args["batch"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            data / f"{i}.png")
    unet = bench._ldm_unet(args)
    ctx = bench._inputs(args)[2][:1]
    proj = torch.nn.Conv2d(3, 4, 8, stride=8).to(dev, dtype)

    class Host(TrainingHost):
        def __init__(self, mode: str):
            self.mode, self.stamps, self._lock = mode, [], threading.Lock()

        def lock(self):
            return self._lock

        def family(self):
            return "sd1"

        def output_dir(self):
            return root / "out"

        def build_model(self, job):
            from lib_lora.hosts.cli.attention import sdpa_attention
            return TrainableModel("sd1", unet, [],
                                  lambda caps, sizes=None: Conditioning(ctx.expand(len(caps), -1, -1)),
                                  lambda px: proj(px.to(dtype)), torch.linspace(0.9999, 0.005, 1000),
                                  context=lambda: sdpa_attention(unet), device=torch.device(dev))

        def progress(self, job):
            if dev == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

        def yield_interval(self):
            return None if self.mode == "off" else 0.0

        def generation_waiting(self):
            return self.mode == "suspend"

    def run(mode: str, n: int) -> list[float]:
        host = Host(mode)
        body = {"output_name": f"bench-{mode}-{n}", "dataset": {"train_dir": str(root / "data"), "resolution": side,
                                                                 "enable_buckets": False},
                "network": {"rank": args["rank"], "alpha": args["rank"], "train_text_encoder": False},
                "max_train_epochs": None, "max_train_steps": args["steps"] + 2, "batch_size": args["batch"],
                "max_grad_norm": 0.0, "mixed_precision": "no" if args["precision"] == "fp32" else args["precision"],
                "learning_rate": 1e-4}
        job = JobRunner(host).start(body)
        job.wait()
        assert job.state == "finished", job.error
        stamps = host.stamps[2:]  # after the epoch that fills the caches
        return [b - a for a, b in zip(stamps, stamps[1:])]

    modes = ("off", "check", "suspend")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args["rounds"]):
        for m in modes:
            steps = run(m, r)
            times[m].append(statistics.median(steps))
            print(f"round {r + 1} {m}: {times[m][-1] * 1000:.2f} ms/step", flush=True)
    off = statistics.median(times["off"])
    boundary = boundary_seconds(Host("check"))
    where = f"{dev} {args['precision']}" + ("" if dev == "cuda" else f", {args['threads']} threads")
    print(f"\nSD1.5 layout width {args['width']}, latent {args['latent']}, batch {args['batch']}, rank {args['rank']}, "
          f"{where}; median of {args['rounds']} rounds")
    for m in modes:
        per_round = ", ".join(f"{a / b:.3f}" for a, b in zip(times[m], times["off"]))
        print(f"{m:<8} {statistics.median(times[m]) * 1000:9.2f} ms/step  {statistics.median(times[m]) / off:.3f}x off"
              f"  (per round {per_round})" + ("  target <= 1.02" if m == "check" else ""))
    print(f"one step boundary with nothing waiting: {boundary * 1e6:.1f} us = {1 + boundary / off:.5f}x the off step")


def boundary_seconds(host, n: int = 20000) -> float:
    """Seconds of one "generation first" step boundary while nothing waits (median of 5 batches of ``n``)."""
    from lib_lora.training.interleave import Interleaver
    from lib_lora.training.job import Job
    from lib_lora.training.trainer import StepBoundary

    class _Plan:  # the fields a Job reads
        config = type("C", (), {"output_name": "x"})()
        summary: dict = {}
        total_steps = 1

    class _Request:
        name, config, preset, resume_from = "x", _Plan.config, None, None

    job = Job(_Request(), _Plan())
    job.state = "running"
    interleaver = Interleaver(job, host)
    per = []
    for _ in range(5):
        t0 = time.perf_counter()
        for step in range(n):
            interleaver.between_steps(StepBoundary(None, None, None, step, None, [], 0.0, None, None))
        per.append((time.perf_counter() - t0) / n)
    return statistics.median(per)


if __name__ == "__main__":
    main()
