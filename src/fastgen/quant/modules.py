"""Quantized drop-in replacements for ``nn.Linear`` and 1x1 ``nn.Conv2d``.

The weight is stored quantized (``qweight`` + fp32 ``weight_scale`` buffers) and the matmul runs
through ``fastgen.ops.quant`` (Triton on CUDA, the PyTorch reference elsewhere). The modules keep
the float module's interface: ``in_features``/``out_features`` (``in_channels``/``out_channels``),
``bias``, and a ``weight`` property that returns the dequantized weight in the float module's shape.
``module.half()`` / ``.to(dtype)`` convert the bias and the compute dtype but never the quantized
weights or their scales (fp8 codes are "floating point" to ``nn.Module._apply``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError
from fastgen.quant.config import QuantConfig

logger = logging.getLogger(__name__)

#: Smallest SmoothQuant factor, so a dead channel (amax 0) never divides by zero.
SMOOTH_MIN = 1e-5


def smooth_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant factors ``s_j = amax(X_j)**alpha / amax(W_j)**(1 - alpha)`` per input channel.

    act_amax ``(K,)``, weight ``(N, K)``; returns fp32 ``(K,)``, clamped to >= SMOOTH_MIN, and 1 for
    channels that are zero in the activations or the weights (nothing to migrate).
    """
    a = act_amax.float().to(weight.device)
    w = weight.detach().float().abs().amax(dim=0)  # (K,)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp_min(SMOOTH_MIN)


def static_input_scale(act_amax: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """One per-tensor int8 scale ``max_j(amax_j / s_j) / 127`` (1.0 when the input was all zeros)."""
    a = act_amax.float()
    if smooth is not None:
        a = a / smooth.to(a.device)
    amax = a.max()
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).reshape(())


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, smooth: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of x ``(..., K)`` with one calibrated scale, and that scale per row ``(...)``.

    fp32 division and round half to even as ``quantize_per_token``, but clamped to [-128, 127], the
    range ONNX QuantizeLinear and TensorRT saturate to, so the exported graph computes the same codes
    (inputs beyond the calibrated range saturate either way). A row of x holding a NaN or an infinity
    gets scale NaN (and codes 0), so the GEMM's output row is NaN, not saturated or zeroed garbage;
    finite rows are unaffected, bit for bit.
    """
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth
    finite = torch.isfinite(x).all(dim=-1)  # (...,): of x itself, so finite rows stay exactly as they were
    v = torch.where(finite[..., None], xf / input_scale, torch.zeros((), dtype=xf.dtype, device=xf.device))
    xq = torch.round(v).clamp(-128.0, 127.0).to(torch.int8)
    scale = torch.where(finite, input_scale, torch.full((), float("nan"), device=input_scale.device))
    return xq, scale.expand(x.shape[:-1]).contiguous()


def quant_linear(x: torch.Tensor, config: QuantConfig, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, smooth: torch.Tensor | None, input_scale: torch.Tensor | None
                 ) -> torch.Tensor:
    """The quantized layer's math on x ``(..., K)`` -> ``(..., N)`` in x's dtype, via ``fastgen.ops.quant``."""
    from fastgen.ops import quant as q

    if config.activation is None:
        bits = 4 if config.weight_dtype == "int4" else 8
        return q.weight_only_gemm(x, qweight, weight_scale, bits=bits, group_size=config.group_size, bias=bias)
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if config.activation == "static":
        xq, xs = quantize_static(x, input_scale, smooth)
        y = q.int8_gemm(xq, xs, qweight, weight_scale, bias=bias, out_dtype=out_dtype)
    else:
        xq, xs = q.quantize_per_token(x, dtype=config.act_dtype, smooth=smooth)
        gemm = q.fp8_gemm if config.act_dtype == "fp8" else q.int8_gemm
        y = gemm(xq, xs, qweight, weight_scale, bias=bias, out_dtype=out_dtype)
    return y.to(x.dtype)


class QuantLinear(nn.Module):
    """``nn.Linear`` with quantized weights (and, for W8A8/fp8 configs, quantized activations)."""

    # Buffers whose dtype is part of the format: ``_apply`` moves them but never converts them.
    FIXED_DTYPE = ("qweight", "weight_scale", "smooth", "input_scale")

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from fastgen.ops.quant import fp8_dtype

        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.float_dtype = dtype
        n, k, g = out_features, in_features, config.group_size
        if config.weight_dtype == "int4":
            if g is None or k % g or k % 2:
                raise InvalidArgumentError("in_features", k, f"multiples of group_size={g}")
            qweight = torch.zeros(n, k // 2, dtype=torch.uint8, device=device)  # (N, K // 2) packed
            scale = torch.ones(n, k // g, dtype=torch.float32, device=device)  # (N, K // group)
        else:
            qdtype = fp8_dtype() if config.weight_dtype == "fp8" else torch.int8
            qweight = torch.zeros(n, k, dtype=qdtype, device=device)  # (N, K)
            scale = torch.ones(n, dtype=torch.float32, device=device)  # (N,)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        # SmoothQuant divisor of the input channels (K,), and the static per-tensor input scale ().
        smooth = torch.ones(k, dtype=torch.float32, device=device) if config.uses_smoothing else None
        self.register_buffer("smooth", smooth)
        static = torch.ones((), dtype=torch.float32, device=device) if config.activation == "static" else None
        self.register_buffer("input_scale", static)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, *, act_amax: torch.Tensor | None = None
                   ) -> QuantLinear:
        """Quantize ``linear`` (not modified). ``act_amax``: per-input-channel activation maxima
        ``(K,)`` from calibration, needed by SmoothQuant and static configs."""
        weight = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        out._load_float(weight, linear.bias, act_amax)
        return out

    def _load_float(self, weight: torch.Tensor, bias: torch.Tensor | None, act_amax: torch.Tensor | None) -> None:
        from fastgen.ops.quant import quantize_weight

        cfg = self.config
        if cfg.needs_calibration and act_amax is None:
            raise InvalidArgumentError("act_amax", None, reason=f"{cfg.describe()} needs calibration statistics")
        w = weight.float()  # (N, K)
        if cfg.uses_smoothing:
            s = smooth_factors(act_amax, w, cfg.alpha)  # (K,)
            self.smooth.copy_(s)
            w = w * s[None, :]
        if cfg.activation == "static":
            self.input_scale.copy_(static_input_scale(act_amax, self.smooth))
        q, scale = quantize_weight(w, dtype=cfg.weight_dtype, group_size=cfg.group_size)
        self.qweight.copy_(q)
        self.weight_scale.copy_(scale)
        if bias is not None:
            self.bias.data.copy_(bias.detach())

    # -- the float view -----------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``(N, K)``: the weight this layer multiplies by, smoothing undone."""
        from fastgen.ops.quant import dequantize_weight

        w = dequantize_weight(self.qweight, self.weight_scale, dtype=self.config.weight_dtype,
                              group_size=self.config.group_size)
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)`` in the float dtype (a fresh copy)."""
        return self.dequantized_weight().to(self.float_dtype)

    def dequantize(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weights (what this layer computes with)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qweight.device, dtype=self.float_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.train(self.training)

    # -- compute ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from fastgen.quant.onnx import export_linear

            return export_linear(self, x)
        return self.quantized_matmul(x)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., K)`` -> ``(..., N)`` in x's dtype (the eager path; also the ONNX trace's values)."""
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError("input.shape", tuple(x.shape), f"(..., {self.in_features})")
        if not x.dtype.is_floating_point:
            raise InvalidArgumentError("input.dtype", x.dtype, "float16, bfloat16, float32")
        return quant_linear(x, self.config, *self.quant_tensors())

    def quant_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """``(qweight, weight_scale, bias, smooth, input_scale)``: everything :func:`quant_linear` reads."""
        return self.qweight, self.weight_scale, self.bias, self.smooth, self.input_scale

    # -- nn.Module plumbing -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {name: self._buffers[name] for name in self.FIXED_DTYPE if self._buffers.get(name) is not None}
        probe = fn(torch.zeros((), dtype=self.float_dtype, device=self.qweight.device))
        out = super()._apply(fn, recurse)
        for name, old in fixed.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                # Keep the move, undo the conversion.
                self._buffers[name] = old.to(device=new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.float_dtype = probe.dtype
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"config={self.config.describe()}")


class QuantConv1x1(QuantLinear):
    """A 1x1 ``nn.Conv2d`` (any stride, no padding, one group) as a quantized per-pixel linear layer.

    Diffusers' SD 1.x/2.x transformer blocks project in and out with 1x1 convs, and ResNet
    shortcuts are strided 1x1 convs; both are matmuls over channels.
    """

    def __init__(self, in_channels: int, out_channels: int, config: QuantConfig, *,
                 stride: tuple[int, int] = (1, 1), bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_channels, out_channels, config, bias=bias, device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (1, 1)
        self.stride = tuple(stride)
        self.padding = (0, 0)
        self.dilation = (1, 1)
        self.groups = 1

    @staticmethod
    def eligible(conv: nn.Module) -> bool:
        """Whether ``conv`` is a 1x1 ``nn.Conv2d`` that is exactly a per-pixel matmul."""
        if not isinstance(conv, nn.Conv2d):
            return False
        pad = conv.padding if isinstance(conv.padding, tuple) else (conv.padding,)
        return (tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 and all(p == 0 for p in pad)
                and not isinstance(conv.padding, str))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig, *,  # type: ignore[override]
                   act_amax: torch.Tensor | None = None) -> QuantConv1x1:
        if not cls.eligible(conv):
            raise InvalidArgumentError("conv", repr(conv), "1x1 nn.Conv2d with groups=1 and padding 0")
        weight = conv.weight.detach()  # (N, K, 1, 1)
        out = cls(conv.in_channels, conv.out_channels, config, stride=tuple(conv.stride),
                  bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
        out._load_float(weight.reshape(conv.out_channels, conv.in_channels), conv.bias, act_amax)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``(out_channels, in_channels, 1, 1)`` in the float dtype."""
        return self.dequantized_weight().to(self.float_dtype)[:, :, None, None]

    def dequantize(self) -> nn.Conv2d:  # type: ignore[override]
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=self.bias is not None,
                         device=self.qweight.device, dtype=self.float_dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight()[:, :, None, None])
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (batch, C, H, W) -> (batch, H', W', C): channels last, so each pixel is a row of the matmul.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InvalidArgumentError("input.shape", tuple(x.shape), f"(batch, {self.in_channels}, H, W)")
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        y = super().forward(x.permute(0, 2, 3, 1))  # (batch, H', W', N)
        # A channels-last view: diffusers permutes proj_in's output straight back to (batch, HW, N).
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}, "
                f"bias={self.bias is not None}, config={self.config.describe()}")


def quantized_module_for(module: nn.Module) -> type[QuantLinear] | None:
    """The quantized class that can replace ``module`` (None if it cannot be replaced)."""
    if isinstance(module, QuantLinear):
        return None
    if isinstance(module, nn.Linear):
        return QuantLinear
    if QuantConv1x1.eligible(module):
        return QuantConv1x1
    return None
