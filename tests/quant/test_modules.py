"""QuantLinear / QuantConv1x1 against an independent float64 reference of the quantized math."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastgen.errors import InvalidArgumentError
from fastgen.quant import (
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConv1x1,
    QuantLinear,
    sqnr_db,
)
from fastgen.quant.api import apply_quantization_recipe, quantization_recipe, quantize_
from fastgen.quant.modules import smooth_factors

FP8 = torch.float8_e4m3fn


def _codes(v: torch.Tensor, kind: str, lo: float = -127.0) -> torch.Tensor:
    """Codes of fp32 ``v`` (already divided by its scale), written out independently of fastgen."""
    if kind == "fp8":
        return v.clamp(-448, 448).to(FP8).double()
    hi = 7.0 if kind == "int4" else 127.0
    return torch.round(v).clamp(-8.0 if kind == "int4" else lo, hi).double()


def _scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, config, act_amax=None) -> torch.Tensor:
    """y = x @ W.T + b with the config's quantization, accumulated in float64."""
    x, w = x.float(), w.float()
    kind = config.weight_dtype
    qmax = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[kind]
    if config.uses_smoothing:
        s = (act_amax.pow(config.alpha) / w.abs().amax(0).pow(1 - config.alpha)).clamp_min(1e-5)
        x, w = x / s, w * s
    n, k = w.shape
    g = config.group_size or k
    wg = w.reshape(n, k // g, g)
    ws = _scale(wg.abs().amax(-1), qmax)  # (N, K/g)
    wdq = (_codes(wg / ws[..., None], kind) * ws[..., None].double()).reshape(n, k)
    x2 = x.reshape(-1, k)
    if config.activation is None:
        y = x2.double() @ wdq.T
    elif config.activation == "static":
        xs = _scale(act_amax.max() if not config.uses_smoothing else (act_amax / s).max(), 127.0)
        y = (_codes(x2 / xs, "int8", lo=-128.0) * xs.double()) @ wdq.T
    else:
        aq = 448.0 if kind == "fp8" else 127.0
        xs = _scale(x2.abs().amax(-1), aq)  # (M,)
        y = (_codes(x2 / xs[:, None], kind) * xs[:, None].double()) @ wdq.T
    if b is not None:
        y = y + b.detach().double()
    return y.reshape(*x.shape[:-1], n)


CONFIGS = [Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32), Int4WeightOnlyConfig(group_size=128),
           Int8DynamicConfig(), Int8DynamicConfig(smoothquant=True, alpha=0.6), Int8StaticConfig(),
           Int8StaticConfig(smoothquant=True), Fp8DynamicConfig()]
#: SQNR (dB) each config must reach on one Gaussian layer against fp32 (well below what it measures).
LAYER_FLOOR = {"Int8WeightOnlyConfig": 38, "Int4WeightOnlyConfig": 16, "Int8DynamicConfig": 32,
               "Int8StaticConfig": 25, "Fp8DynamicConfig": 25}


def _layer(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
    return lin


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("shape", [(1, 128), (77, 128), (2, 113, 128)])
def test_quant_linear_matches_reference(config, shape):
    lin = _layer(128, 77, bias=shape[0] != 1)
    x = torch.randn(*shape) * torch.linspace(0.2, 3.0, 128)  # uneven channel ranges
    amax = (x * 1.1).reshape(-1, 128).abs().amax(0)  # calibration saw a bit more than this batch
    q = QuantLinear.from_float(lin, config, act_amax=amax if config.needs_calibration else None)
    y = q(x)
    ref = reference(x, lin.weight.detach(), lin.bias, config, amax)
    assert y.shape == (*shape[:-1], 77) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    floor = LAYER_FLOOR[type(config).__name__]
    assert sqnr_db(lin(x), y) > floor


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), Int8DynamicConfig(), Fp8DynamicConfig()],
                         ids=lambda c: c.describe())
def test_non_contiguous_and_odd_inputs(config):
    lin = _layer(96, 257)
    q = QuantLinear.from_float(lin, config)
    base = torch.randn(96, 2, 77)
    x = base.permute(1, 2, 0)  # (2, 77, 96), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(q(x), q(x.contiguous()), rtol=0, atol=0)
    ref = reference(x, lin.weight.detach(), lin.bias, config)
    torch.testing.assert_close(q(x).double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_all_zero_rows_stay_finite():
    q = QuantLinear.from_float(_layer(64, 32), Int8DynamicConfig())
    x = torch.randn(4, 64)
    x[1] = 0
    y = q(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], q.bias.detach())


@pytest.mark.parametrize("config", [Int8DynamicConfig(), Int8WeightOnlyConfig(), Fp8DynamicConfig()],
                         ids=lambda c: c.describe())
@pytest.mark.parametrize("stride", [1, 2])
def test_conv1x1_is_a_per_pixel_linear(config, stride):
    torch.manual_seed(1)
    conv = nn.Conv2d(48, 40, 1, stride=stride)
    x = torch.randn(2, 48, 9, 7)
    q = QuantConv1x1.from_float(conv, config)
    y = q(x)
    assert y.shape == conv(x).shape
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(conv.weight[:, :, 0, 0])
        lin.bias.copy_(conv.bias)
    pixels = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1)
    expected = QuantLinear.from_float(lin, config)(pixels).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert sqnr_db(conv(x), y) > 25
    assert q.weight.shape == conv.weight.shape and q.kernel_size == (1, 1) and q.stride == (stride, stride)


def test_only_plain_1x1_convs_are_eligible():
    assert QuantConv1x1.eligible(nn.Conv2d(8, 8, 1))
    assert QuantConv1x1.eligible(nn.Conv2d(8, 8, 1, stride=2))
    assert not QuantConv1x1.eligible(nn.Conv2d(8, 8, 3, padding=1))
    assert not QuantConv1x1.eligible(nn.Conv2d(8, 8, 1, groups=2))
    assert not QuantConv1x1.eligible(nn.Conv2d(8, 8, 1, padding=1))
    assert not QuantConv1x1.eligible(nn.Linear(8, 8))
    with pytest.raises(InvalidArgumentError):
        QuantConv1x1.from_float(nn.Conv2d(8, 8, 3), Int8DynamicConfig())


@pytest.mark.parametrize("config", CONFIGS[:5], ids=lambda c: c.describe())
def test_dequantize_gives_the_float_layer_it_computes_with(config):
    lin = _layer(128, 64)
    amax = torch.rand(128) + 0.5
    q = QuantLinear.from_float(lin, config, act_amax=amax if config.needs_calibration else None)
    back = q.dequantize()
    assert isinstance(back, nn.Linear) and back.weight.shape == lin.weight.shape
    torch.testing.assert_close(back.weight, q.weight)
    assert sqnr_db(lin.weight, back.weight) > (15 if config.weight_dtype == "int4" else 35)
    if config.activation is None:  # weight-only: the float layer is exactly the quantized computation
        x = torch.randn(5, 128)
        torch.testing.assert_close(back(x), q(x), rtol=1e-5, atol=1e-5)


def test_interface_and_repr():
    lin = _layer(64, 32)
    q = QuantLinear.from_float(lin, Int8DynamicConfig())
    assert (q.in_features, q.out_features) == (64, 32)
    assert q.weight.shape == (32, 64) and q.weight.dtype == torch.float32
    assert q.qweight.dtype == torch.int8 and q.weight_scale.shape == (32,)
    assert "Int8DynamicConfig" in repr(q) and "in_features=64" in repr(q)
    with pytest.raises(InvalidArgumentError, match="input.shape"):
        q(torch.randn(3, 63))
    q4 = QuantLinear.from_float(_layer(128, 8), Int4WeightOnlyConfig(group_size=64))
    assert q4.qweight.shape == (8, 64) and q4.qweight.dtype == torch.uint8 and q4.weight_scale.shape == (8, 2)
    copy.deepcopy(q4)


def test_half_converts_bias_and_compute_but_never_the_quantized_format():
    lin = _layer(64, 32)
    q = QuantLinear.from_float(lin, Fp8DynamicConfig()).half()
    assert q.qweight.dtype == FP8 and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.float16 and q.float_dtype == torch.float16 and q.weight.dtype == torch.float16
    x = torch.randn(3, 64)
    y = q(x.half())
    assert y.dtype == torch.float16
    assert sqnr_db(lin(x), y.float()) > 25
    s = QuantLinear.from_float(lin, Int8StaticConfig(smoothquant=True), act_amax=torch.ones(64)).to(torch.bfloat16)
    assert s.smooth.dtype == torch.float32 and s.input_scale.dtype == torch.float32


def test_smooth_factors_formula_and_guards():
    amax = torch.tensor([4.0, 0.0, 1.0])
    w = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 0.0]])
    s = smooth_factors(amax, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0]))  # sqrt(4)/sqrt(1); dead channels: 1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(8, 32, 1, stride=2)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(x).permute(0, 2, 3, 1))


def test_state_dict_round_trip_through_the_recipe():
    torch.manual_seed(0)
    model = _Net()
    from fastgen.quant import calibrate

    x = torch.randn(2, 8, 6, 6)
    calibrate(model, [x])
    quantize_(model, Int8StaticConfig(smoothquant=True), skip=())
    recipe = quantization_recipe(model)
    assert set(recipe) == {"proj", "mlp.0", "mlp.2"}
    assert recipe["proj"] == {"kind": "conv1x1", "stride": [2, 2], "config": Int8StaticConfig(smoothquant=True, skip=()).to_dict()}
    torch.manual_seed(1)
    fresh = _Net()
    apply_quantization_recipe(fresh, recipe)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
