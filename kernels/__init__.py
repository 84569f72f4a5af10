"""Triton kernels, installed as ``fastgen.kernels``.

Kernels take tensors and know nothing of models; they import nothing above them (``fastgen.core``,
``fastgen.errors``), and ``fastgen.ops`` dispatches to them. Each op lives in its own kernel file; its
plain PyTorch reference (the CPU fallback and the test oracle) and its argument checks live beside it in
a ``*_reference`` module that never imports triton, so that the fallback never pays for triton. The
kernel file re-exports its reference; ``fastgen.ops`` re-exports them under its own names.

- ``attention``: fused forward attention, (batch, seq, heads, head_dim) with any strides.
  Reference: ``attention_reference``.
- ``attention_tma``: the same attention for sm_90+ through TMA tensor descriptors (warp-specialised on
  sm_100): what contiguous fp16 / bf16 attention runs on Hopper and Blackwell.
- ``attention_int8``: SageAttention-style attention: smoothed K, int8 Q.K^T, fp16 or fp8 P.V.
  Reference: ``attention_int8_reference``.
- ``quantize_per_token``: dynamic per-token int8 / fp8 e4m3 quantization, scales in the same pass.
- ``gemm_int8``: W8A8 GEMM, per-token x per-channel scales, bias and activation epilogue.
- ``gemm_fp8``: fp8 e4m3 GEMM with row-wise scales (Ada / Hopper tensor cores). Both run the one scaled
  GEMM body of ``_gemm_common`` (the operand type a constexpr), each with its own launch-config table.
- ``gemm_weight_only``: int8 / group-wise int4 weights dequantized in registers, for small token counts.
- ``quant_reference``: the quantization formats and the references of the three quant kernels above.
- ``device``: where kernels run (CUDA, or the CPU under Triton's interpreter: :func:`~fastgen.kernels.device.interpreting`).
- ``launch``: a kernel launch as data (``KernelLaunch``): every launcher is ``plan_<op>(..., arch=...)``,
  which returns its launches for any target, plus ``<op>_fwd``, which runs them on the tensors' GPU.
- ``launch_configs``: launch configs per GPU architecture (per-architecture default tables and tuned
  tables in ``configs/``, persistent autotune cache).
- ``aot`` / ``aot_cases``: compile planned launches for sm80 / sm89 / sm90 / sm100 without a GPU and read
  the machine code (the CI compile gate and ``benchmarks/static_gpu_report.py``).
"""

# This folder is fastgen's kernel *source*: it is meant to be imported as ``fastgen.kernels``. When the
# repository root is on ``sys.path`` (``python -m pytest`` or a REPL started there), ``import kernels``
# would find this folder instead of the installed Hugging Face ``kernels`` package, which transformers
# (>= 5.25) imports whenever it is installed. Hand such an import over to the installed package.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("this 'kernels' folder is fastgen's kernel source: import fastgen.kernels instead")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
