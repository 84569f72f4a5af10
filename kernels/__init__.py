"""Triton kernels, installed as ``fastgen.kernels``.

Kernels take tensors and know nothing of models. Each op lives in its own file; its plain PyTorch
reference (the CPU fallback and the test oracle) lives beside the op's dispatch in ``fastgen.ops`` so
that the fallback never imports triton, and is re-exported from the kernel file.

- ``attention``: fused forward attention, (batch, seq, heads, head_dim) with any strides.
- ``attention_int8``: SageAttention-style attention: smoothed K, int8 Q.K^T, fp16 or fp8 P.V.
- ``quantize_per_token``: dynamic per-token int8 / fp8 e4m3 quantization, scales in the same pass.
- ``gemm_int8``: W8A8 GEMM, per-token x per-channel scales, bias and activation epilogue.
- ``gemm_fp8``: fp8 e4m3 GEMM with row-wise scales (Hopper tensor cores).
- ``gemm_weight_only``: int8 / group-wise int4 weights dequantized in registers, for small token counts.
- ``tuning``: launch configs per GPU architecture (shipped tables, persistent autotune cache).
"""
