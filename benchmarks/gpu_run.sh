#!/usr/bin/env bash
# Everything that needs a GPU, in two device calls (see ../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh            # once, here: diffusers and friends into .whl/
#   run(command="bash benchmarks/gpu_run.sh kernels", carry=[".whl"], timeout_s=540)     # ~7 min
#   run(command="bash benchmarks/gpu_run.sh pipelines", carry=[".whl"], timeout_s=360)   # ~5 min
# Each part fits the device tool's 10-minute limit and both together its 15 minutes of device time
# (every step below runs under its own timeout, the budgets summed in the comments). `all` runs both
# parts in one call, for a machine without that limit. Results land in $OUT (then committed to
# benchmarks/results/): the CUDA tests' tails, attention / quant GEMM benchmarks with autotuning (tuned
# tables in $OUT/autotune, to commit as kernels/configs/<kernel>.json), pipeline latency against diffusers.
set -uo pipefail
PART=${1:-all}
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
FASTGEN_BUILD_EXT=${FASTGEN_BUILD_EXT:-1} python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || FASTGEN_BUILD_EXT=0 python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# GPU tests first (they are skipped on CPU machines): 120 s (kernels) / 60 s (pipelines)
case "$PART" in
  kernels) KEYS="kernels or attention or quant or optimize" ; T=120 ;; pipelines) KEYS="generator or scorer or torch_backend" ; T=60 ;;
  *) KEYS="" ; T=240 ;;
esac
timeout $T python3 -m pytest -q -m "cuda" ${KEYS:+-k "$KEYS"} tests 2>&1 | tail -20 | tee "$OUT/cuda_tests_$PART.txt"
# Kernels (~300 s): attention (fp16: the TMA kernel on sm_90+, the pointer kernel beside it, triton-int8) against
# every SDPA backend, and the quantized GEMMs against cuBLAS bf16 and torch._scaled_mm, autotuned (only
# candidates whose compiled kernel fits this GPU are timed); UNet step latency per quantization config.
export FASTGEN_AUTOTUNE_DIR="$OUT/autotune"
if want kernels; then
  timeout 170 python3 benchmarks/bench_attention.py --dtype fp16 --autotune --json "$OUT/attention_fp16.json" 2>&1 | tail -25
  timeout 80 python3 benchmarks/bench_quant_gemm.py --autotune --json "$OUT/quant_gemm.json" 2>&1 | tail -25
  timeout 60 python3 benchmarks/bench_quant.py --gpu --out "$OUT/quant_unet.json" 2>&1 | tail -15
fi
# Pipelines (~230 s): SD 1.5 at 512x512, 50 steps, and SDXL at 1024x1024, 30 steps: fastgen's torch backend
# (fp16) against diffusers' own pipeline (fp16) in the same run (onnxruntime on this machine is a CPU build).
if want pipelines; then
  timeout 130 python3 benchmarks/bench_pipeline.py --preset sd15 --device cuda --precision fp16 --backends torch \
    --steps 50 --height 512 --iters 3 --out "$OUT/pipeline_sd15_cuda.json" 2>&1 | tail -5
  timeout 100 python3 benchmarks/bench_pipeline.py --preset sdxl --device cuda --precision fp16 --backends torch \
    --steps 30 --height 1024 --iters 2 --out "$OUT/pipeline_sdxl_cuda.json" 2>&1 | tail -5
fi
ls -la "$OUT"
