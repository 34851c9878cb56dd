"""Seconds per training step of the toy preset's LoRA at other ranks (CPU, a few minutes).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/toy_step_cost.py            # ranks 16 8 4 2 1
    .venv/bin/python benchmarks/toy_step_cost.py --net 4/16 --net 16/4 --rounds 3     # linear rank / conv rank

What a lower rank saves per step decides how many more steps it can train in the toy preset's time (README,
"Training quality on the toy world").  Each setting trains the star concept with benchmarks/concept.py's
``train`` (the Trainer the tab and the CLI use) in this one process, rounds interleaved; a step's cost is
the mean over the steady steps (after ``--warmup``), and the minimum over rounds is printed with each round's
figure.  The step count a setting may train in the preset's time is preset steps x preset ms / its ms.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import concept  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 4, 2, 1], help="rank = conv rank = alpha")
    ap.add_argument("--net", action="append", default=[], metavar="R/C", help="linear rank / conv rank (repeatable)")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--warmup", type=int, default=40, help="steps left out of the mean")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not 0 < a.warmup < a.steps:
        raise SystemExit("--warmup must lie between 0 and --steps")
    nets = [(r, r) for r in a.ranks] + [tuple(int(x) for x in n.split("/")) for n in a.net]

    from lib_lora.hosts.cli.checkpoint import load_checkpoint
    from lib_lora.toyworld.base_model import DEFAULT_PATH

    ck = load_checkpoint(DEFAULT_PATH)
    work = Path(tempfile.mkdtemp(prefix="toy-step-cost-"))
    data = concept.write_datasets(work / "data", 60, 0)
    ms: dict[tuple[int, int], list[float]] = {}
    for _ in range(a.rounds):
        for r, c in nets:
            s = {**concept.preset_settings("toy"), "network.rank": r, "network.alpha": float(r),
                 "network.conv_rank": c, "network.conv_alpha": float(c)}
            _, clock = concept.train(ck, data["star"], work / "out", f"r{r}c{c}", s, a.steps, 0, 8, 2)
            ms.setdefault((r, c), []).append(1000 * (clock[a.steps] - clock[a.warmup]) / (a.steps - a.warmup))
    ref = min(ms[nets[0]])
    print(f"toy preset, batch 8, steps {a.warmup}-{a.steps}, {a.rounds} rounds; x = ms / ms of rank {nets[0][0]}/{nets[0][1]}")
    for (r, c), v in ms.items():
        print(f"rank {r:>3} / conv {c:>3}: {min(v):6.1f} ms/step  x{min(v) / ref:.2f}  "
              f"(rounds: {' '.join(f'{x:.1f}' for x in v)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
