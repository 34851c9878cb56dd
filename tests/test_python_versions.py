"""The extension runs inside the WebUI's own Python, which is 3.10 for WebUI 1.10: no newer syntax."""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(str(p) for d in ("lib_lora", "scripts") for p in (ROOT / d).rglob("*.py")) + \
    [str(ROOT / "preload.py"), str(ROOT / "install.py")]
CHECK = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n"


def _python310() -> str | None:
    candidates = [os.environ.get("PYTHON310", ""), shutil.which("python3.10") or "",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))]
    for exe in filter(None, candidates):
        r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "(3, 10)":
            return exe
    return None


def test_sources_compile_on_python_3_10():
    exe = _python310()
    if exe is None:   # best effort without the interpreter: the parser's own 3.10 feature check
        for f in SOURCES:
            ast.parse(Path(f).read_text(encoding="utf-8"), f, feature_version=(3, 10))
        return
    r = subprocess.run([exe, "-c", CHECK, *SOURCES], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
