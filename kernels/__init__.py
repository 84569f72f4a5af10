"""Triton kernels, installed as ``fastgen.kernels``.

Kernels take tensors and know nothing of models. Each op lives in its own file; its plain PyTorch
reference (the CPU fallback and the test oracle) lives beside the op's dispatch in ``fastgen.ops`` so
that the fallback never imports triton, and is re-exported from the kernel file.

- ``attention``: fused forward attention, (batch, seq, heads, head_dim) with any strides.
"""
