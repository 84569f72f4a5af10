"""LoRA file parsing: diffusers/PEFT, diffusers' older keys, kohya; alphas; bad files and arguments."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastgen.errors import InvalidArgumentError
from fastgen.lora import AdapterSelection, LoraLayer, parse_lora_arg, parse_state_dict, read_lora
from fastgen.lora.targets import fused_deltas, resolve_keys

SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32),
          "down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),
          "conv_in": (32, 4, 3, 3)}


def _pair(rank, out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def test_the_three_formats_give_the_same_layers():
    down, up = _pair(3, 32, 32)
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    peft = parse_state_dict({f"unet.{mod}.lora_A.weight": down, f"unet.{mod}.lora_B.weight": up}, name="p",
                            metadata={"unet.lora_alpha": 6})
    old = parse_state_dict({f"unet.{mod[:-len('to_out.0')]}processor.to_out_lora.down.weight": down,
                            f"unet.{mod[:-len('to_out.0')]}processor.to_out_lora.up.weight": up,
                            f"unet.{mod}.alpha": torch.tensor(6.0)}, name="o")
    kohya_key = "lora_unet_" + mod.replace(".", "_")
    kohya = parse_state_dict({f"{kohya_key}.lora_down.weight": down, f"{kohya_key}.lora_up.weight": up,
                              f"{kohya_key}.alpha": torch.tensor(6.0)}, name="k")
    want = up @ down * 2.0  # alpha 6 / rank 3
    for adapter in (peft, old, kohya):
        deltas = fused_deltas([adapter], [1.0], "unet", SHAPES)
        assert list(deltas) == [mod]
        torch.testing.assert_close(deltas[mod], want)
    assert kohya.kohya and resolve_keys(kohya, "unet", SHAPES) == {mod.replace(".", "_"): mod}


def test_alpha_defaults_to_rank_and_alpha_pattern_overrides():
    down, up = _pair(4, 32, 32)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{q}.lora_A.weight": down, f"{q}.lora_B.weight": up}  # un-prefixed: the UNet
    assert parse_state_dict(sd, name="x").layers["unet"][q].alpha == 4.0
    meta = {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}}
    assert parse_state_dict(sd, name="x", metadata=meta).layers["unet"][q].alpha == 2.0


@pytest.mark.parametrize("rank", [1, 3, 32])
def test_conv_lora_delta_is_the_two_convolutions(rank):
    """A LoCon layer (3x3 down, 1x1 up) fused into the conv weight computes down-then-up exactly."""
    g = torch.Generator().manual_seed(rank)
    down, up = torch.randn(rank, 4, 3, 3, generator=g), torch.randn(32, rank, 1, 1, generator=g)
    layer = LoraLayer(down, up, alpha=float(rank))
    x = torch.randn(2, 4, 9, 7, generator=g)
    want = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    got = torch.nn.functional.conv2d(x, layer.delta(), padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_text_encoder_keys_with_or_without_text_model():
    down, up = _pair(2, 16, 16)
    shapes = {"encoder.layers.0.self_attn.q_proj": (16, 16)}
    for key in ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                "text_encoder.encoder.layers.0.self_attn.q_proj"):
        a = parse_state_dict({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, name="t")
        assert list(resolve_keys(a, "text_encoder", shapes).values()) == ["encoder.layers.0.self_attn.q_proj"]
    k = parse_state_dict({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
                          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up}, name="k")
    assert list(resolve_keys(k, "text_encoder", shapes).values()) == ["encoder.layers.0.self_attn.q_proj"]


def test_two_adapters_sum_with_their_scales():
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    (d1, u1), (d2, u2) = _pair(2, 32, 32, 1), _pair(5, 32, 32, 2)
    a = parse_state_dict({f"{q}.lora_A.weight": d1, f"{q}.lora_B.weight": u1}, name="a")
    b = parse_state_dict({f"{q}.lora_A.weight": d2, f"{q}.lora_B.weight": u2}, name="b",
                         metadata={"unet.lora_alpha": 10})
    got = fused_deltas([a, b], [0.5, -1.5], "unet", SHAPES)[q]
    torch.testing.assert_close(got, 0.5 * u1 @ d1 - 1.5 * 2 * u2 @ d2)
    assert fused_deltas([a, b], [0.0, 0.0], "unet", SHAPES) == {}


def test_bad_files_and_keys_fail_in_one_line(tmp_path):
    down, up = _pair(2, 32, 32)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = [
        ({f"unet.{q}.lora_A.weight": down}, "has no up"),
        ({f"unet.{q}.weight": down}, "not a LoRA weight"),
        ({"lora_unet_x.lora_down.weight": down, "lora_unet_x.something": up}, "not a kohya"),
        ({}, "holds no tensors"),
    ]
    for sd, match in cases:
        with pytest.raises(InvalidArgumentError, match=match) as info:
            parse_state_dict(sd, name="bad")
        assert "\n" not in str(info.value)
    wrong = parse_state_dict({f"unet.{q}.lora_A.weight": torch.randn(2, 7), f"unet.{q}.lora_B.weight": up}, name="w")
    with pytest.raises(InvalidArgumentError, match=r"has weight \(32, 32\), the LoRA makes \(32, 7\)"):
        resolve_keys(wrong, "unet", SHAPES)
    nowhere = parse_state_dict({"unet.mid.nothing.lora_A.weight": down, "unet.mid.nothing.lora_B.weight": up}, name="n")
    with pytest.raises(InvalidArgumentError, match="no adaptable module 'mid.nothing'"):
        resolve_keys(nowhere, "unet", SHAPES)
    (tmp_path / "x.bin").write_bytes(b"\x80\x02")
    with pytest.raises(InvalidArgumentError, match="pickled checkpoints are never loaded"):
        read_lora(tmp_path / "x.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgumentError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    with pytest.raises(InvalidArgumentError, match="no such"):
        read_lora(tmp_path / "missing.safetensors")
    save_file({f"unet.{q}.lora_A.weight": down, f"unet.{q}.lora_B.weight": up}, str(tmp_path / "ok.safetensors"))
    assert read_lora(tmp_path / "ok.safetensors").name == "ok"


def test_selection_and_cli_argument_validation():
    assert AdapterSelection.of("a").weights == (1.0,)
    assert AdapterSelection.of(["a", "b"], 0.5).weights == (0.5, 0.5)
    assert AdapterSelection.of(None).names == ()
    for names, weights, match in [(["a", "a"], None, "named twice"), (["a"], [1, 2], "one per adapter"),
                                  (["a"], [float("nan")], "finite"), ([""], None, "names of loaded"),
                                  (["a"], "x", "a number or a list")]:
        with pytest.raises(InvalidArgumentError, match=match):
            AdapterSelection.of(names, weights)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("dir/style.safetensors:0.6") == ("dir/style.safetensors", 0.6)
    assert parse_lora_arg("c:/x/style.safetensors:-1") == ("c:/x/style.safetensors", -1.0)
    assert parse_lora_arg("a:b") == ("a:b", 1.0)
    with pytest.raises(InvalidArgumentError, match="finite SCALE"):
        parse_lora_arg("x.safetensors:inf")
