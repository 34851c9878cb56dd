"""Install what LoRA Workshop needs — only packages that are missing, never up- or downgrading.

The WebUI runs this file with its own Python on every start (with the WebUI folder on
PYTHONPATH, so ``launch`` is importable); it also works standalone: ``python install.py``.
The runtime needs only safetensors, which the WebUI already ships.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

# pip distribution name -> what it is for
REQUIREMENTS = {"safetensors": "reading and writing LoRA files"}
if sys.version_info < (3, 11):  # 3.11 reads TOML with its own tomllib
    REQUIREMENTS["toml"] = "reading kohya's config.toml and dataset.toml"


def _is_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            return False


def _run_pip(command: str, desc: str | None = None) -> None:
    print(f"Installing {desc or command}")
    subprocess.run([sys.executable, "-m", "pip", *command.split(), "--prefer-binary"], check=True)


def _tools():
    """The WebUI's helpers (they honour --skip-install and INDEX_URL) when running under it."""
    try:
        import launch
        if callable(getattr(launch, "is_installed", None)) and callable(getattr(launch, "run_pip", None)):
            return launch.is_installed, launch.run_pip
    except Exception:  # not under the WebUI, or its launch module failed to import
        pass
    return _is_installed, _run_pip


def main() -> list[str]:
    is_installed, run_pip = _tools()
    installed = []
    for package, why in REQUIREMENTS.items():
        if not is_installed(package):
            # a bare name: pip installs it without touching anything already installed
            run_pip(f"install {package}", f"{package} for LoRA Workshop ({why})")
            installed.append(package)
    return installed


if __name__ == "__main__":
    main()
