"""Runs fuzz cases in a child process under an address-space cap; one JSON line per case.

Usage (from ``runner.py``): ``python worker.py SEED START STOP TMPDIR MEM_MB``.  Before each
case it prints ``START <i>``, after it ``RESULT <json>``, so the parent can time a case out
and kill this process without losing the results so far.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from fuzz.cases import TARGETS, make_case, make_library  # noqa: E402
from lib_lora import cli, metadata, payloads  # noqa: E402
from lib_lora.fileio import LoraFileError  # noqa: E402
from lib_lora.library import Library  # noqa: E402
from lib_lora.modelmap import ModelMap  # noqa: E402
from lib_lora.network import load_network  # noqa: E402
from lib_lora.patcher import Patcher  # noqa: E402
from loras import activation, same, snapshot  # noqa: E402
from tiny_models import build_sd1  # noqa: E402

OK = ("loaded", "LoraFileError")  # the two acceptable outcomes


def _strict_json(obj) -> None:
    """What FastAPI's JSONResponse does: no NaN/Infinity (ValueError otherwise)."""
    json.dumps(obj, allow_nan=False)


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    frames = [f for f in tb if "lib_lora" in f.filename] or tb
    f = frames[-1] if frames else None
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}" + \
        (f" [{Path(f.filename).name}:{f.lineno}]" if f else "")


def _is_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "not enough memory" in str(e) or "can't allocate memory" in str(e)


class Case:
    def __init__(self, mm: ModelMap, tiny):
        self.mm, self.tiny = mm, tiny
        self.modules = (tiny.unet, *[m for _, m in tiny.text_encoders])
        self.original = snapshot(*self.modules)

    def run(self, path: Path) -> dict:
        res: dict = {"outcome": None, "notes": []}
        try:
            self._run(path, res)
        except BaseException as e:  # classify everything the code under test lets escape
            if isinstance(e, KeyboardInterrupt):
                raise
            res["outcome"] = "memory" if _is_memory(e) else f"crash:{res.get('stage')}:{type(e).__name__}"
            res["error"] = _where(e)
        return res

    def _run(self, path: Path, res: dict) -> None:
        res["stage"] = "load"
        net = None
        try:
            net = load_network(path)
            res["outcome"] = "loaded"
        except LoraFileError as e:
            msg = str(e)
            res["outcome"] = "LoraFileError"
            res["error"] = msg[:200]
            if "\n" in msg or path.name not in msg and path.stem not in msg:
                res["outcome"] = "bad-message"
        res["stage"] = "library"
        lib = Library([path.parent])
        (entry,) = lib.entries
        _strict_json(payloads.entry_json(entry))
        _strict_json(payloads.entry_json(entry, detail=True))
        _strict_json(payloads.builtin_json(entry))
        metadata.metadata_summary(metadata.decoded_metadata(entry.metadata))
        metadata.tag_frequency(metadata.decoded_metadata(entry.metadata), top=24)
        if net is not None and entry.header_error:
            res["notes"].append("header_error on a loadable file")
        res["stage"] = "inspect"
        for argv in (["inspect", "--json", str(path)], ["inspect", str(path)]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(argv)
            if net is not None:
                if rc != 0:
                    raise AssertionError(f"inspect refused a file load_network accepted: {err.getvalue()[:200]}")
                if "--json" in argv:
                    json.loads(out.getvalue(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            elif rc != 2 or err.getvalue().strip().count("\n"):
                raise AssertionError(f"inspect of a refused file: rc {rc}, stderr {err.getvalue()[:200]!r}")
        if net is None:
            return
        res["stage"] = "apply"
        patcher = Patcher(self.mm)
        try:
            report = patcher.apply([activation(net, 1.0, 1.0)])
            res["applied"] = sum(report.applied.values())
            if report.messages:
                res["notes"].append("messages")
            if any(not torch.isfinite(s.tensor()).all() for s in patcher.slots.values()):
                res["notes"].append("non-finite merge")
        finally:
            patcher.restore()
        if not same(self.original, snapshot(*self.modules)):
            raise AssertionError("model not restored bitwise")


def _library_case(seed: int, tmp: Path) -> dict:
    """A folder of fuzzed files, symlink loops and links out of it: refresh() must finish and index
    every real file inside (an entry, with its error if it has one) and nothing outside."""
    root, outside = tmp / "Lora", tmp / "outside"
    expect = make_library(seed, root, outside)
    res: dict = {"outcome": None, "notes": [], "stage": "refresh"}
    try:
        lib = Library([root])
        lib.refresh()
        names = {e.relname for e in lib.entries}
        missing = [n for n in expect["inside"] if n.rsplit(".", 1)[0] not in names]
        leaked = [n for n in expect["outside"] if n in names]
        for e in lib.entries:
            _strict_json(payloads.entry_json(e))
        res["entries"] = len(lib.entries)
        res["errors"] = sum(bool(e.header_error) for e in lib.entries)
        if missing or leaked:
            res["outcome"] = "library:wrong-entries"
            res["error"] = f"missing {missing[:3]}, indexed from outside {leaked}"
        else:
            res["outcome"] = "library:ok"
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        res["outcome"] = f"crash:library:{type(e).__name__}"
        res["error"] = _where(e)
    return res


def _cap_memory(mb: int) -> None:
    """Allow ``mb`` MiB of address space beyond what the process (torch, the model) has now."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + (mb << 20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str]) -> int:
    seed, start, stop, tmp, mem_mb = int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3]), int(argv[4])
    library = len(argv) > 5 and argv[5] == "library"
    torch.set_num_threads(1)
    case = None
    if not library:  # library cases only scan: no model needed
        tiny = build_sd1(seed=0)
        mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
        missing = [k for k, shape in TARGETS if mm.get(k) is None or tuple(mm.get(k).weight().shape) != shape]
        if missing:
            raise SystemExit(f"fuzz base targets not in the tiny SD1 model: {missing}")
        case = Case(mm, tiny)
    _cap_memory(mem_mb)
    for i in range(start, stop):
        print(f"START {i}", flush=True)
        folder = tmp / f"c{i}"
        folder.mkdir(parents=True, exist_ok=True)
        if library:
            res = _library_case(seed + i, folder)
            res["steps"] = ["library"]
        else:
            path, steps = make_case(seed, i, folder)
            res = case.run(path)
            res["steps"] = steps
        res["i"] = i
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print("RESULT " + json.dumps(res), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
