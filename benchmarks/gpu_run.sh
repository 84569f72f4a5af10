#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (see ../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh            # once, here: diffusers and friends into .whl/
#   run(command="bash benchmarks/gpu_run.sh [all|attention|quant|pipelines]", carry=[".whl"], timeout_s=600)
# One part per call fits the device tool's 10-minute limit (all of it does not). Each benchmark runs under
# its own timeout, so one that hangs does not take the others' results with it.
# Results land in $OUT (and are then committed to benchmarks/results/).
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
# GPU tests first (they are skipped on CPU machines)
case "$PART" in
  attention) KEYS="attention or optimize" ;; quant) KEYS="quant" ;; pipelines) KEYS="generator or scorer or torch_backend" ;; *) KEYS="" ;;
esac
timeout 240 python3 -m pytest -q -m "cuda" ${KEYS:+-k "$KEYS"} tests 2>&1 | tail -20 | tee "$OUT/cuda_tests_$PART.txt"
# Kernels: attention (fp16/bf16, triton-int8) against every SDPA backend, tuned configs saved for kernels/configs/;
# quantized GEMMs against cuBLAS bf16 and torch._scaled_mm; UNet step latency per quantization config.
export FASTGEN_AUTOTUNE_DIR="$OUT/autotune"
if want attention; then
  timeout 200 python3 benchmarks/bench_attention.py --dtype bf16 --autotune --json "$OUT/attention_bf16.json" 2>&1 | tail -25
  timeout 150 python3 benchmarks/bench_attention.py --dtype fp16 --autotune --json "$OUT/attention_fp16.json" 2>&1 | tail -25
fi
if want quant; then
  timeout 200 python3 benchmarks/bench_quant_gemm.py --autotune --json "$OUT/quant_gemm.json" 2>&1 | tail -25
  timeout 200 python3 benchmarks/bench_quant.py --gpu --out "$OUT/quant_unet.json" 2>&1 | tail -15
fi
# SD 1.5 at 512x512, 50 steps, and SDXL at 1024x1024, 30 steps: fastgen's torch backend (fp16) against
# diffusers' own pipeline (fp16) in the same run (onnxruntime on this machine is a CPU build).
if want pipelines; then
  timeout 240 python3 benchmarks/bench_pipeline.py --preset sd15 --device cuda --precision fp16 --backends torch \
    --steps 50 --height 512 --iters 3 --out "$OUT/pipeline_sd15_cuda.json" 2>&1 | tail -5
  timeout 200 python3 benchmarks/bench_pipeline.py --preset sdxl --device cuda --precision fp16 --backends torch \
    --steps 30 --height 1024 --iters 2 --out "$OUT/pipeline_sdxl_cuda.json" 2>&1 | tail -5
fi
ls -la "$OUT"
