#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has none).  From the repository root:
#   OUT=/tmp/gpu bash tools/device_check.sh                       # everything: at most 21 minutes (the parts' limits)
#   OUT=/tmp/gpu PARTS="bench_fp16 bench_sdxl" bash tools/device_check.sh   # the step benchmarks alone
#   (each part fits a 10-minute call on its own: PARTS=bench_fp16, then PARTS=bench_sdxl)
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

PARTS=${PARTS:-test_cuda bench_fp16 bench_sdxl suite_cpu}

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

# the CUDA tests: training a half model, frozen-layer backward on GPU kernels, merging, the CLI in fp16
part test_cuda 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
# SD1.5 as a WebUI holds it (fp16 weights, fp16 autocast, loss scaling) at 512 px, batch 4, rank 16:
# ours and ours with each step lever off (one-forward, fused-adamw, flat-params, grads-in-place,
# batched-pointwise: SD1.5's proj_in/out at batch 4) vs the diffusers + peft recipe vs a bare
# forward+backward; per variant: wall s/step, the GPU's busy (kernel) time per step, wall/kernel, peak
# CUDA memory over the model; ratios ours/reference (time, memory), each lever-off variant/ours,
# ours/bare, ours wall/kernel.  (ours-lean is left out to fit the part's limit: `--variants ours-lean`.)
part bench_fp16 480 "$PY" benchmarks/train.py --device cuda --precision fp16 --latent 64 --batch 4 --steps 6 --rounds 2 \
    --variants ours,ours-no-one-forward,ours-no-fused-adamw,ours-no-flat-params,ours-no-grads-in-place,ours-no-batched-pointwise,reference,bare
# SDXL (SGM UNet, fp16) at 1024 px, batch 1: ours, ours with the gradients returned to autograd, reference,
# bare; the same columns and ratios
part bench_sdxl 240 "$PY" benchmarks/train.py --device cuda --precision fp16 --family sdxl --latent 128 --batch 1 \
    --steps 6 --rounds 1 --variants ours,ours-no-grads-in-place,reference,bare
# the CPU suite on this machine's python and torch (the one-GPU machine cannot run the two-process NCCL test)
part suite_cpu 240 env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -p no:cacheprovider -n 8 -k "not two_processes" tests
