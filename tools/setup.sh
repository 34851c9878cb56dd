#!/usr/bin/env bash
# One-time set-up of a development/CI environment in .venv (no WebUI needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# Stability-AI's ldm package (what the WebUI runs); its own pins are ancient, hence --no-deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps stable-diffusion-sdkit==2.1.5
