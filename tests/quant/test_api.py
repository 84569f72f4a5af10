"""quantize_: what it swaps, what it skips, idempotence, and its errors (nothing half-done)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fastgen
from fastgen.errors import InvalidArgumentError
from fastgen.quant import (
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConv1x1,
    QuantLinear,
    calibrate,
    dequantize_,
    quantize_,
    quantized_layers,
    sqnr_db,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.time_embedding = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64))
        self.conv_in = nn.Conv2d(4, 64, 3, padding=1)
        self.proj = nn.Conv2d(64, 64, 1)
        self.attn = nn.ModuleDict({"to_q": nn.Linear(64, 64), "to_k": nn.Linear(64, 64, bias=False)})
        self.odd = nn.Linear(48, 64)  # 48: not a multiple of int4's group sizes 32 (ok), 64, 128
        self.conv_out = nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.conv_in(x)) + self.time_embedding(t)[:, :, None, None]
        tokens = h.flatten(2).transpose(1, 2)  # (batch, HW, 64)
        tokens = self.attn["to_q"](tokens) + self.attn["to_k"](tokens) + self.odd(tokens[..., :48])
        return self.conv_out(tokens.transpose(1, 2).reshape(h.shape))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 16, generator=g)


def _kinds(module: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear))}


def test_default_skip_list_keeps_time_embedding_and_outer_convs_in_float():
    m = Block()
    assert quantize_(m, Int8DynamicConfig()) is m
    kinds = _kinds(m)
    assert kinds["time_embedding.0"] == kinds["time_embedding.2"] == "Linear"
    assert kinds["conv_in"] == kinds["conv_out"] == "Conv2d"
    assert kinds["proj"] == "QuantConv1x1"
    assert kinds["attn.to_q"] == kinds["attn.to_k"] == kinds["odd"] == "QuantLinear"
    assert torch.isfinite(m(*_inputs())).all()


def test_skip_argument_and_config_field_override_the_defaults():
    m = quantize_(Block(), Int8WeightOnlyConfig(), skip=())
    assert _kinds(m)["time_embedding.0"] == "QuantLinear"
    m = quantize_(Block(), Int8WeightOnlyConfig(skip=("*attn.*",)))
    kinds = _kinds(m)
    assert kinds["attn.to_q"] == "Linear" and kinds["time_embedding.0"] == "QuantLinear"
    m = quantize_(Block(), Int8WeightOnlyConfig(skip=("*attn.*",)), skip=["odd"])
    assert _kinds(m)["attn.to_q"] == "QuantLinear" and _kinds(m)["odd"] == "Linear"


def test_filter_fn_selects_by_module_and_name():
    seen = []

    def only_attention(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return isinstance(module, nn.Linear) and name.startswith("attn.")

    m = quantize_(Block(), Fp8DynamicConfig(), only_attention)
    assert set(quantized_layers(m)) == {"attn.to_q", "attn.to_k"}
    assert "proj" in seen and "conv_in" not in seen  # only eligible layers are offered


def test_quantize_twice_with_the_same_config_is_a_no_op():
    m = quantize_(Block(), Int8DynamicConfig())
    before = {n: id(q) for n, q in quantized_layers(m).items()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    quantize_(m, Int8DynamicConfig(skip=None))
    assert {n: id(q) for n, q in quantized_layers(m).items()} == before
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_quantize_with_another_config_refuses_and_changes_nothing():
    m = quantize_(Block(), Int8DynamicConfig(), lambda mod, name: name == "attn.to_q")
    kinds = _kinds(m)
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        quantize_(m, Int8WeightOnlyConfig())
    assert _kinds(m) == kinds  # attn.to_k etc. were not converted before the error
    # Layers the new call does not select are no obstacle.
    quantize_(m, Int8WeightOnlyConfig(), lambda mod, name: name == "attn.to_k")
    assert isinstance(m.attn["to_k"], QuantLinear) and m.attn["to_k"].config == Int8WeightOnlyConfig()


def test_nothing_matched_raises():
    with pytest.raises(InvalidArgumentError, match="no nn.Linear or 1x1"):
        quantize_(Block(), Int8DynamicConfig(), lambda mod, name: False)
    with pytest.raises(InvalidArgumentError, match="no nn.Linear or 1x1"):
        quantize_(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()), Int8DynamicConfig())
    with pytest.raises(InvalidArgumentError, match="wrap the layer"):
        quantize_(nn.Linear(8, 8), Int8DynamicConfig())


def test_unknown_config_raises():
    with pytest.raises(InvalidArgumentError, match="config"):
        quantize_(Block(), "int8")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="config type"):
        quantize_(Block(), {"type": "Int2Config"})
    m = quantize_(Block(), Int8DynamicConfig().to_dict())  # a config dict is accepted
    assert quantized_layers(m)


def test_int4_layers_the_group_does_not_divide_stay_float_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="fastgen.quant.api"):
        m = quantize_(Block(), Int4WeightOnlyConfig(group_size=64))
    assert _kinds(m)["odd"] == "Linear" and _kinds(m)["attn.to_q"] == "QuantLinear"
    assert any("odd stays in float" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidArgumentError, match="not divisible by group_size"):
        quantize_(Block(), Int4WeightOnlyConfig(group_size=128), lambda mod, name: name == "odd")


@pytest.mark.parametrize("config", [Int8DynamicConfig(smoothquant=True), Int8StaticConfig()],
                         ids=lambda c: c.describe())
def test_configs_that_need_statistics_refuse_uncalibrated_layers(config):
    m = Block()
    with pytest.raises(InvalidArgumentError, match="fastgen.calibrate"):
        quantize_(m, config)
    assert not quantized_layers(m)
    calibrate(m, [_inputs()])
    quantize_(m, config)
    assert len(quantized_layers(m)) == 4


def test_shared_layers_are_replaced_everywhere():
    shared = nn.Linear(8, 8)
    m = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    quantize_(m, Int8WeightOnlyConfig())
    assert isinstance(m["a"], QuantLinear) and m["b"][0] is m["a"]


def test_dequantize_undoes_quantize():
    m = Block()
    x = _inputs()
    quantize_(m, Int8WeightOnlyConfig())
    y = m(*x)
    dequantize_(m)
    assert not quantized_layers(m)
    assert isinstance(m.proj, nn.Conv2d) and not isinstance(m.proj, QuantConv1x1)
    torch.testing.assert_close(m(*x), y, rtol=1e-4, atol=1e-5)


def test_top_level_names():
    assert fastgen.quantize_ is quantize_
    assert fastgen.calibrate is calibrate
    assert fastgen.Int8DynamicConfig is Int8DynamicConfig
    assert fastgen.Int8StaticConfig is Int8StaticConfig


def test_tiny_unet_quantizes_with_the_default_skip_list():
    comp = fastgen.load_component("tiny", "unet")
    quantize_(comp.module, Int8DynamicConfig())
    names = set(quantized_layers(comp.module))
    # measured as the most sensitive (see DEFAULT_SKIP): time embedding and the residual-stream 1x1 convs
    assert not any("time_embedding" in n or n.endswith(("proj_in", "proj_out", "conv_shortcut")) for n in names)
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert any(n.endswith("time_emb_proj") for n in names)
    quantize_(comp.module, Int8DynamicConfig(), skip=())  # opting in converts the 1x1 convs too
    assert any(isinstance(m, QuantConv1x1) for m in quantized_layers(comp.module).values())
    inputs = comp.spec.sample_inputs("min")
    assert torch.isfinite(comp(inputs)["noise_pred"]).all()


@pytest.mark.parametrize(("config", "floor_db"), [(Int8DynamicConfig(), 50.0), (Fp8DynamicConfig(), 38.0)])
def test_a_dit_quantizes_with_the_default_skip_list(config, floor_db):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                         num_layers=2, cross_attention_dim=64, sample_size=8, patch_size=2,
                                         caption_channels=32).eval()
    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([10.0, 600.0])

    def run(m):
        with torch.no_grad():
            return m(x, encoder_hidden_states=text, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    ref = run(model)
    quantize_(model, config)
    names = set(quantized_layers(model))
    # the timestep MLP and the final projection, the most sensitive layers of a DiT, stay in float
    assert not any("timestep_embedder" in n or n == "proj_out" for n in names)
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert sqnr_db(ref, run(model)) > floor_db
