"""Triton kernels, installed as ``fastgen.kernels``.

Kernels take tensors and know nothing of models. Each op lives in its own file with a plain
PyTorch reference that is both the CPU fallback and the test oracle. The kernels arrive with the
attention and quantization issues; this package exists so that the install layout is fixed now.
"""
