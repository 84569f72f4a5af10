"""``fastgen.optimize`` on diffusion transformers: SD3 / SD3.5, FLUX and PixArt attention through ``fastgen.ops.attention``.

Oracle: the same model unoptimized (diffusers' own processors: SDPA, or ``dispatch_attention_fn``'s native
backend for FLUX) in fp32, with the same weights and inputs. Optimized outputs must agree within
``assert_close(rtol=1e-4, atol=2e-5)`` (as ``test_optimize.py``) for the triton (interpreted on the CPU,
TRITON_INTERPRET=1 from conftest), sdpa and reference backends; restoring must put the very same processor
objects back and give bit-identical outputs. Models are built from small diffusers configs with the features
that matter: SD3.5's dual attention layers and q/k ``rms_norm``, a ``context_pre_only`` last block, FLUX's
double- and single-stream blocks with rotary embeddings and ``guidance_embeds``, PixArt's padded caption.
Odd token counts: a 48x80 px image (6x10 latents: 15 patches of 2x2), text of 77 or 113 tokens.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

import fastgen
import fastgen.ops.attention as attention_module
from fastgen.errors import UnsupportedError
from fastgen.ops.attention_dit import FastgenFluxAttnProcessor, FastgenJointAttnProcessor

BACKENDS = ("triton", "sdpa", "reference")
TOL = {"rtol": 1e-4, "atol": 2e-5}
LATENT_H, LATENT_W = 6, 10  # a 48x80 px image


def _seeded(make):
    """``make()`` with weights drawn from a fixed seed (the global RNG is left alone), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- models: name -> (build, run(model, text_len), attention layers, fastgen processor class) ------------------

def _sd3_build():
    # Two blocks: block 0 with SD3.5's dual attention (attn + self-only attn2 sharing one processor object),
    # block 1 the last, context_pre_only. 2 heads of 16 (the kernel's smallest head dim).
    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"))


def _sd3_run(model, text_len: int):
    g = _gen(text_len)
    x = torch.randn(2, 16, LATENT_H, LATENT_W, generator=g)
    text, pooled = torch.randn(2, text_len, 24, generator=g), torch.randn(2, 12, generator=g)
    return model(x, text, pooled, torch.tensor([10.0, 800.0]), return_dict=False)[0]


def _flux_build():
    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)))


def _flux_inputs(text_len: int):
    """FluxPipeline's inputs for 6x10 latents of 16 channels packed into 2x2 patches: 15 tokens of 64."""
    g = _gen(100 + text_len)
    h, w = LATENT_H // 2, LATENT_W // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {"hidden_states": torch.randn(2, h * w, 64, generator=g),
            "encoder_hidden_states": torch.randn(2, text_len, 24, generator=g),
            "pooled_projections": torch.randn(2, 12, generator=g), "timestep": torch.tensor([0.01, 0.8]),
            "img_ids": img_ids.reshape(h * w, 3), "txt_ids": torch.zeros(text_len, 3),
            "guidance": torch.tensor([3.5, 3.5])}


def _flux_run(model, text_len: int):
    return model(**_flux_inputs(text_len), return_dict=False)[0]


def _pixart_build():
    return _seeded(lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24))


def _pixart_run(model, text_len: int):
    g = _gen(200 + text_len)
    mask = torch.ones(2, text_len, dtype=torch.long)
    mask[1, text_len // 3:] = 0  # a padded caption (T5's attention mask): a key-padding mask
    x, text = torch.randn(2, 4, LATENT_H, LATENT_W, generator=g), torch.randn(2, text_len, 24, generator=g)
    return model(x, encoder_hidden_states=text, timestep=torch.tensor([10, 500]), encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


MODELS = {
    "sd3": (_sd3_build, _sd3_run, 3, FastgenJointAttnProcessor),
    "flux": (_flux_build, _flux_run, 2, FastgenFluxAttnProcessor),
    "pixart": (_pixart_build, _pixart_run, 2, None),  # AttnProcessor2_0: the UNet path's FastgenAttnProcessor
}


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = MODELS[name][0]()
    return models[name]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Shapes of the Triton kernel's launches (the custom op calls ``_triton`` by its module-level name)."""
    calls = []
    real = attention_module._triton

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(attention_module, "_triton", spy)
    return calls


def _processors(model) -> dict[str, object]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


@pytest.mark.parametrize("text_len", [77, 113])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_optimized_matches_and_restores(models, name, backend, text_len, kernel_calls):
    build, run, n_layers, cls = MODELS[name]
    model = _model(models, name)
    before = _processors(model)
    with torch.no_grad():
        ref = run(model, text_len)
        report = fastgen.optimize(model, attention=backend, strict=True)
        assert len(report.layers) == n_layers and set(report.layers.values()) == {backend} and not report.skipped
        if cls is not None:
            assert all(type(_processors(model)[n]) is cls for n in report.layers)
        out = run(model, text_len)
        torch.testing.assert_close(out, ref, **TOL)
        if backend == "triton":
            assert len(kernel_calls) == n_layers  # every layer ran the kernel once (strict: no fallback)
        restored = report.restore()
        assert set(restored.restored) == set(report.layers)
        after = _processors(model)
        assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
        assert torch.equal(run(model, text_len), ref)


def test_token_layouts_reach_the_kernel(models, kernel_calls):
    """The kernel sees diffusers' joint sequences in fastgen's (batch, seq, heads, head_dim) layout."""
    seq_img = (LATENT_H // 2) * (LATENT_W // 2)
    with torch.no_grad():
        for name, expected in (("sd3", [(2, seq_img + 77, 2, 16), (2, seq_img, 2, 16), (2, seq_img + 77, 2, 16)]),
                               ("flux", [(2, 77 + seq_img, 2, 16)] * 2)):
            kernel_calls.clear()
            report = fastgen.optimize(_model(models, name), "triton", strict=True)
            MODELS[name][1](_model(models, name), 77)
            report.restore()
            assert kernel_calls == expected, name


def test_sd3_dual_attention_shares_its_processor_again_after_restore(models):
    model = _model(models, "sd3")
    block = model.transformer_blocks[0]
    shared = block.attn.processor
    assert shared is block.attn2.processor and type(shared) is JointAttnProcessor2_0
    report = fastgen.optimize(model, "sdpa")
    # one fastgen processor per layer (each carries its own layer name), both wrapping the shared original
    assert block.attn.processor is not block.attn2.processor
    assert block.attn.processor.original is shared and block.attn2.processor.original is shared
    assert block.attn2.processor.policy.name == "transformer_blocks.0.attn2"
    report.restore()
    assert block.attn.processor is shared and block.attn2.processor is shared


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_optimize_twice_is_idempotent(models, name):
    build, run, n_layers, cls = MODELS[name]
    model = _model(models, name)
    before = _processors(model)
    with torch.no_grad():
        ref = run(model, 77)
        fastgen.optimize(model, "reference")
        first = _processors(model)
        again = fastgen.optimize(model, "reference")
        assert len(again.layers) == n_layers
        for n, processor in _processors(model).items():
            # a new policy on a fresh processor around the same original: never a wrapper of a wrapper
            assert type(processor) is cls and processor.original is before[n] and processor is not first[n]
        torch.testing.assert_close(run(model, 77), ref, **TOL)
        switched = fastgen.optimize(model, "sdpa")
        assert set(switched.layers.values()) == {"sdpa"} and not switched.restored
        assert all(p.policy.backend == "sdpa" and p.original is before[n] for n, p in _processors(model).items())
        fastgen.optimize(model, None)
        assert all(p is before[n] for n, p in _processors(model).items())
        assert torch.equal(run(model, 77), ref)


def test_flux_fused_projections(kernel_calls):
    model = _flux_build()
    with torch.no_grad():
        ref = _flux_run(model, 77)
        model.fuse_qkv_projections()
        assert all(m.fused_projections for m in model.modules() if isinstance(m, FluxAttention))
        fused_ref = _flux_run(model, 77)
        report = fastgen.optimize(model, "triton", strict=True)
        torch.testing.assert_close(_flux_run(model, 77), fused_ref, **TOL)
        torch.testing.assert_close(_flux_run(model, 77), ref, rtol=1e-4, atol=1e-4)
    assert len(report.layers) == 2 and len(kernel_calls) == 4


def _flux_attention():
    return _seeded(lambda: FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, bias=True,
                                         context_pre_only=False, eps=1e-6))


def test_flux_attention_mask(kernel_calls, caplog):
    """A key-padding mask over FLUX's joint sequence (text first) runs the kernel with it; any other mask
    runs diffusers' processor for that call (strict: raises naming the backend and the layer)."""
    attn = _flux_attention()
    g = _gen(7)
    x, ctx = torch.randn(2, 15, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1, 5:9] = False  # the last 4 text tokens of the second prompt are padding
    additive = torch.zeros(2, 1, 1, 24).masked_fill(~padding[:, None, None, :], float("-inf"))
    shared = padding[1:, None, :]  # (1, 1, seq): one pattern for every prompt, broadcast as SDPA does
    banded = torch.ones(24, 24, dtype=torch.bool).triu(-2).tril(2).expand(2, 1, 24, 24)  # differs per query
    with torch.no_grad():
        refs = {name: attn(x, ctx, attention_mask=m) for name, m in
                (("padding", padding), ("additive", additive), ("shared", shared), ("banded", banded))}
        fastgen.optimize(attn, "triton")
        for name, mask in (("padding", padding), ("additive", additive), ("shared", shared)):
            for a, b in zip(attn(x, ctx, attention_mask=mask), refs[name]):
                torch.testing.assert_close(a, b, **TOL)
        assert len(kernel_calls) == 3 and kernel_calls[0] == (2, 24, 2, 16)
        with caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            out = attn(x, ctx, attention_mask=banded)
        assert all(torch.equal(a, b) for a, b in zip(out, refs["banded"])) and len(kernel_calls) == 3
        assert "not key-padding" in caplog.text and "running the sdpa path" in caplog.text
        fastgen.optimize(attn, "triton", strict=True)
        with pytest.raises(UnsupportedError, match="'triton' cannot serve layer 'FluxAttention'.*not key-padding"):
            attn(x, ctx, attention_mask=banded)


def test_unroutable_attention_is_left_alone(caplog):
    """Layers whose processor fastgen does not reproduce keep it, each with the reason in ``report.skipped``
    (and the count in the log line), like the UNet path; the others in the model are still routed."""

    class CustomFluxProcessor(FluxAttnProcessor):  # a subclass may change the math: exact types only
        pass

    custom, backend_set, plain = _flux_attention(), _flux_attention(), _flux_attention()
    custom.set_processor(CustomFluxProcessor())
    backend_set.set_attention_backend("native")  # the user chose a diffusers attention backend
    classic = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor2_0())  # PixArt's / UNets'
    kept = {"custom": custom.processor, "backend_set": backend_set.processor}
    root = torch.nn.ModuleDict({"custom": custom, "backend_set": backend_set, "plain": plain, "classic": classic})
    with caplog.at_level(logging.INFO, logger="fastgen.ops.optimize"):
        report = fastgen.optimize(root, "reference")
    assert dict(report.layers) == {"plain": "reference", "classic": "reference"}
    assert "CustomFluxProcessor is not supported" in report.skipped["custom"]
    assert "diffusers attention backend" in report.skipped["backend_set"]
    assert all(root[n].processor is p for n, p in kept.items())
    assert "2 attention layers -> reference, 2 skipped" in caplog.text
    report.restore()
    assert type(plain.processor) is FluxAttnProcessor


def test_flux_attn_processor_2_0_and_torch_compile(kernel_calls):
    """``FluxAttnProcessor2_0()`` (deprecated) builds a ``FluxAttnProcessor``: routed the same way; under
    torch.compile the layer keeps the kernel (a custom op)."""
    import warnings

    from diffusers.models.attention_processor import FluxAttnProcessor2_0

    attn = _flux_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn.set_processor(FluxAttnProcessor2_0())
    x, ctx = torch.randn(1, 6, 32, generator=_gen(10)), torch.randn(1, 3, 32, generator=_gen(11))
    with torch.no_grad():
        ref = attn(x, ctx)
        report = fastgen.optimize(attn, "triton", strict=True)
        assert dict(report.layers) == {"FluxAttention": "triton"}
        compiled = torch.compile(attn, backend="eager", dynamic=False)
        for a, b in zip(compiled(x, ctx), ref):
            torch.testing.assert_close(a, b, **TOL)
    assert kernel_calls


def test_export_runs_the_original_processor(models):
    """While tracing for export, fastgen's processors run diffusers' own (the exported graph is unchanged)."""
    attn = _flux_attention()
    x, ctx = torch.randn(1, 6, 32, generator=_gen(8)), torch.randn(1, 3, 32, generator=_gen(9))
    fastgen.optimize(attn, "triton", strict=True)
    program = torch.export.export(attn, (x, ctx))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("fastgen" in t for t in targets) and any("scaled_dot_product_attention" in t for t in targets)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_kernel(name, dtype, kernel_calls):
    """On the GPU (run with TRITON_INTERPRET=0 for the compiled kernel): within 2x the error of the
    unoptimized model at the same dtype, both against the fp32 CPU model."""
    build, run, _, _ = MODELS[name]
    model = build()
    with torch.no_grad():
        ref = run(model, 113).float()
        model = model.to("cuda", dtype)
        base = run(model, 113).float().cpu()
        report = fastgen.optimize(model, "triton", strict=True)
        out = run(model, 113).float().cpu()
    assert kernel_calls and report.layers
    err, err_base = (out - ref).abs().max().item(), (base - ref).abs().max().item()
    assert err <= 2 * err_base + 1e-3 * ref.abs().max().item(), (err, err_base)
