"""Drive ``worker.py`` in a child process: a per-case time limit, restarts after a hang or a crash.

``python -m tests.fuzz --cases 3000`` prints the number of cases per outcome class.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
DEFAULT_CASES = 140       # CI: a few seconds beyond the child's start-up
DEFAULT_LIBRARIES = 2
CASE_TIMEOUT_S = 20.0     # generous for a loaded CI machine; a healthy case takes milliseconds
START_TIMEOUT_S = 120.0   # importing torch and building the tiny model
MEM_MB = 1536             # address space a case may add on top of the worker's own


def run_cases(n: int, seed: int = 0, library: bool = False, timeout_s: float = CASE_TIMEOUT_S,
              mem_mb: int = MEM_MB) -> list[dict]:
    """Results of cases 0..n-1, one dict per case (``outcome`` names its class)."""
    results: list[dict] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory(prefix="lora-fuzz-") as tmp:
        nxt = 0
        while nxt < n:
            argv = [sys.executable, str(WORKER), str(seed), str(nxt), str(n), tmp, str(mem_mb)]
            if library:
                argv.append("library")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            current, deadline, buf = None, time.monotonic() + START_TIMEOUT_S, b""
            try:
                while True:
                    left = deadline - time.monotonic()
                    ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
                    if not ready:  # this case (or the start-up) ran past its limit
                        results.append({"i": current if current is not None else nxt, "outcome": "timeout",
                                        "steps": [], "notes": []})
                        proc.kill()
                        break
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:  # the worker ended: finished, or died inside a case
                        proc.wait()
                        if current is not None:
                            err = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                            results.append({"i": current, "outcome": f"died:rc={proc.returncode}",
                                            "error": " ".join(err), "steps": [], "notes": []})
                        elif nxt < n:
                            raise RuntimeError("fuzz worker failed: " + proc.stderr.read().decode(errors="replace"))
                        break
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        text = line.decode()
                        if text.startswith("START "):
                            current = int(text.split()[1])
                            deadline = time.monotonic() + timeout_s
                        elif text.startswith("RESULT "):
                            results.append(json.loads(text[7:]))
                            current, nxt = None, results[-1]["i"] + 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                proc.stderr.close()
            nxt = max(nxt, results[-1]["i"] + 1 if results else nxt)
    return results


def summary(results: list[dict]) -> str:
    counts = collections.Counter(r["outcome"] for r in results)
    notes = collections.Counter(n for r in results for n in r.get("notes", []))
    lines = [f"{len(results)} cases"]
    lines += [f"  {k:<40} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if notes:
        lines.append("notes (loaded cases):")
        lines += [f"  {k:<40} {v}" for k, v in sorted(notes.items())]
    bad = [r for r in results if r["outcome"] not in ("loaded", "LoraFileError", "library:ok")]
    if bad:
        lines.append("first failures by class:")
        seen: set[str] = set()
        for r in bad:
            if r["outcome"] in seen:
                continue
            seen.add(r["outcome"])
            lines.append(f"  case {r['i']} {r['outcome']}: {r.get('error', '')} {r.get('steps')}")
        details = collections.Counter(f"{r['outcome']} {r.get('error', '').split(' [')[0][:60]}"
                                      for r in bad)
        lines.append("failure kinds:")
        lines += [f"  {v:5d} {k}" for k, v in details.most_common(40)]
    peak = max((r.get("peak_rss_mb", 0) for r in results), default=0)
    lines.append(f"peak worker RSS {peak} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description="fuzz the LoRA file loader")
    ap.add_argument("--cases", type=int, default=DEFAULT_CASES)
    ap.add_argument("--libraries", type=int, default=DEFAULT_LIBRARIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S)
    ap.add_argument("--json", help="also write every case's result to this file")
    args = ap.parse_args(argv)
    t = time.monotonic()
    results = run_cases(args.cases, args.seed, timeout_s=args.timeout)
    if args.libraries:
        results += run_cases(args.libraries, args.seed, library=True, timeout_s=args.timeout)
    print(summary(results))
    print(f"{time.monotonic() - t:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["outcome"] in ("loaded", "LoraFileError", "library:ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
