#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has none).  From the repository root:
#   OUT=/tmp/gpu bash tools/device_check.sh
# Logs go to $OUT.  Packages missing from the machine's python can come as wheels in .whl/
# (diffusers, stable-diffusion-sdkit, transformers 4.x, open_clip, ...: see tools/setup.sh).
# Each part has its own time limit, so a hang in one still leaves the others' logs.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import sys, torch, transformers, diffusers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

# the CUDA tests: training a half model, frozen-layer backward on GPU kernels, merging, the CLI in fp16
part test_cuda 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
# ours (lean frozen layers off on CUDA) and ours-lean vs the diffusers + peft recipe vs a bare
# forward+backward, as a WebUI holds SD1.5 (fp16)
part bench_fp16 240 "$PY" benchmarks/train.py --device cuda --precision fp16 --latent 64 --batch 4 --steps 12 --rounds 2
# the CPU suite on this machine's python and torch (the one-GPU machine cannot run the two-process NCCL test)
part suite_cpu 240 env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -p no:cacheprovider -n 8 -k "not two_processes" tests
