#!/usr/bin/env bash
# Everything that needs a GPU, in three device calls (see ../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh            # once, here: diffusers and friends into .whl/
#   run(command="bash benchmarks/gpu_run.sh kernels", carry=[".whl"], timeout_s=540)     # ~7 min
#   run(command="bash benchmarks/gpu_run.sh pipelines", carry=[".whl"], timeout_s=360)   # ~5 min
#   run(command="bash benchmarks/gpu_run.sh tensorrt", carry=[".whl"], timeout_s=600)    # <= 9.5 min (own budget)
#   run(command="bash benchmarks/gpu_run.sh dit", carry=[".whl"], timeout_s=560)         # ~8 min (own session)
# Each part fits the device tool's 10-minute limit; kernels + pipelines fit its 15 minutes of device time,
# tensorrt takes a session of its own (every step below runs under its own timeout, the budgets summed in
# the comments). `all` runs every part in one call, for a machine without those limits. Results land in $OUT
# (then committed to benchmarks/results/): the CUDA tests' tails, attention / quant GEMM benchmarks with
# autotuning (tuned tables in $OUT/autotune, to commit as kernels/configs/<kernel>.json), pipeline latency
# against diffusers, TensorRT against the torch backend (bench_tensorrt.py). TensorRT comes from
# .whl/tensorrt*.whl when carried (the libs wheel is far over carry's 64 MiB, so usually it is absent: then
# bench_tensorrt.py records "tensorrt": "unavailable: ..." and times torch alone, and the part runs all of
# sd15 and its pipeline instead, in ~4 min).
set -uo pipefail
PART=${1:-all}
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The tensorrt part runs no custom kernel: skip compiling the extension there (minutes of device time).
[ "$PART" = tensorrt ] && : "${FASTGEN_BUILD_EXT:=0}"
FASTGEN_BUILD_EXT=${FASTGEN_BUILD_EXT:-1} python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || FASTGEN_BUILD_EXT=0 python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# TensorRT (tensorrt part): the carried wheels, unless the install above already made `import tensorrt` work.
if want tensorrt; then
  if ls .whl/tensorrt*.whl >/dev/null 2>&1; then
    python3 -c "import tensorrt" 2>/dev/null \
      || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/tensorrt*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/tensorrt*.whl carried: TensorRT only if this machine has it (else recorded unavailable)"
  fi
  TRT_VERSION=$(python3 -c "import tensorrt; print(tensorrt.__version__)" 2>/dev/null)
  echo "tensorrt: ${TRT_VERSION:-unavailable}" | tee "$OUT/tensorrt_version.txt"
fi
# GPU tests first (they are skipped on CPU machines): 120 s (kernels) / 60 s (pipelines, tensorrt)
MARK="cuda"
case "$PART" in
  kernels) KEYS="kernels or attention or quant or optimize" ; T=120 ;; pipelines) KEYS="generator or scorer or torch_backend" ; T=60 ;;
  tensorrt) KEYS="tensorrt" ; T=60 ; MARK="cuda or tensorrt" ;;
  dit) KEYS="dit" ; T=60 ;;
  *) KEYS="" ; T=240 ; MARK="cuda or tensorrt" ;;
esac
timeout $T python3 -m pytest -q -m "$MARK" ${KEYS:+-k "$KEYS"} tests 2>&1 | tail -20 | tee "$OUT/cuda_tests_$PART.txt"
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
# Diffusion transformers (~8 min): SD3.5 medium and FLUX.1-dev at 1024x1024, 28 steps, bf16 (random weights in fp16
# overflow), fastgen's torch backend (Triton attention) against diffusers on the same modules (bench_pipeline_dit.py:
# FLUX.1-dev's 17B parameters are made once, on the host, in fp32: about 2 minutes of the budget).
if want dit; then
  timeout 170 python3 benchmarks/bench_pipeline_dit.py --preset sd35-medium --device cuda --precision bf16 --steps 28 \
    --height 1024 --iters 1 --out "$OUT/pipeline_sd35-medium_cuda.json" 2>&1 | tail -4
  timeout 300 python3 benchmarks/bench_pipeline_dit.py --preset flux-dev --device cuda --precision bf16 --steps 28 \
    --height 1024 --iters 1 --out "$OUT/pipeline_flux-dev_cuda.json" 2>&1 | tail -4
fi
# TensorRT (~8 min after set-up; TRT_BUDGET_S counts from the script's start, or from here under `all`): fp16 vs torch
# fp16 (each with and without CUDA graphs) and onnxruntime (a CPU build: tiny only), per component, with
# parity against torch fp32. tiny, all components (150 s); sd15's UNet at batch 2, 512x512 (up to 330 s: the
# export, onnxslim and a cold-timing-cache TensorRT build take most of it); sd15's VAE decoder, text encoder and
# the 50-step pipeline against torch only when 150 s are left (their engines take another ~3 min to build).
# Without TensorRT nothing is built for it: then sd15 is run whole, pipeline included (~4 min).
if want tensorrt; then
  export FASTGEN_CACHE_DIR=${FASTGEN_CACHE_DIR:-/tmp/fastgen-engines}  # kept while the machine stays warm
  BUDGET=${TRT_BUDGET_S:-570}
  START=$([ "$PART" = tensorrt ] && echo 0 || echo "$SECONDS")
  BENCH="python3 benchmarks/bench_tensorrt.py --precision fp16"
  timeout 150 $BENCH --presets tiny --pipeline off --json "$OUT/tensorrt_tiny.json" 2>&1 | tail -30
  if [ -n "${TRT_VERSION:-}" ]; then
    timeout 330 $BENCH --presets sd15 --components unet --pipeline off --verify none \
      --json "$OUT/tensorrt_sd15_unet.json" 2>&1 | tail -12
    LEFT=$((BUDGET - (SECONDS - START)))
    if [ "$LEFT" -ge 150 ]; then
      timeout "$LEFT" $BENCH --presets sd15 --components vae-decoder,text-encoder --pipeline on --verify none \
        --json "$OUT/tensorrt_sd15_rest.json" 2>&1 | tail -16
    else
      echo "tensorrt: ${LEFT} s left of ${BUDGET}: sd15 vae-decoder, text-encoder and pipeline not run"
    fi
  else
    LEFT=$((BUDGET - (SECONDS - START)))
    timeout "$((LEFT > 60 ? LEFT : 60))" $BENCH --presets sd15 --pipeline on --verify none \
      --json "$OUT/tensorrt_sd15.json" 2>&1 | tail -22
  fi
fi
ls -la "$OUT"
