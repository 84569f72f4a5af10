"""``fastgen.optimize``: attention of diffusers and transformers models through ``fastgen.ops.attention``.

Oracle: the same model, unoptimized, in fp32 (PyTorch SDPA). Optimized outputs must agree within
``assert_close(rtol=1e-4, atol=2e-5)`` for the triton (interpreted on the CPU, TRITON_INTERPRET=1 from
conftest), sdpa and reference backends; restoring must give bit-identical outputs (the original processor
objects / attention implementations are put back). Models are tiny (8x8 latents, <= 9 tokens) so that the
interpreter stays fast; the tiny preset UNet (head dims 4 and 8) exercises the per-call fallback, a copy
with two heads per block (head dims 16 and 32) the kernel itself.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, PixArtTransformer2DModel, Transformer2DModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import fastgen
import fastgen.ops.attention as attention_module
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.presets import instantiate, preset_config
from fastgen.ops.attention import attention
from fastgen.ops.attention_diffusers import FastgenAttnProcessor
from fastgen.ops.attention_transformers import IMPLEMENTATION, STATE_ATTR
from fastgen.ops.optimize import OptimizeReport, key_padding_from_mask

BACKENDS = ("triton", "sdpa", "reference")
TOL = {"rtol": 1e-4, "atol": 2e-5}


def _seeded(make):
    """``make()`` with weights drawn from a fixed seed (the global RNG is left alone), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval()


def _build(component: str, **overrides):
    library, cls_name, config = preset_config("tiny", component)
    return _seeded(lambda: instantiate(library, cls_name, {**config, **overrides}))


def _inputs(seed: int):
    return torch.Generator().manual_seed(seed)


def _place(model, *tensors):
    """Inputs drawn on the CPU (the same values everywhere), moved to the model's device and float dtype."""
    p = next(model.parameters())
    return [t.to(p.device, p.dtype) if t.is_floating_point() else t.to(p.device) for t in tensors]


# --- models and how to run them: name -> (build, run) -------------------------------------------------------

def _unet_run(model):
    g = _inputs(1)
    x, ehs, t = _place(model, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
                       torch.tensor([10.0, 700.0]))
    return model(x, t, ehs, return_dict=False)[0]


def _vae_run(model):
    (z,) = _place(model, torch.randn(1, 4, 8, 8, generator=_inputs(2)))
    return model.decode(z, return_dict=False)[0]


def _dit_build():  # DiT: patched input, adaLN-zero blocks
    return _seeded(lambda: Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              num_layers=1, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                              num_embeds_ada_norm=1000))


def _dit_run(model):
    x, t, labels = _place(model, torch.randn(2, 4, 8, 8, generator=_inputs(3)), torch.tensor([3, 900]),
                          torch.tensor([1, 7]))
    return model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def _pixart_build():  # DiT blocks with cross-attention over a padded caption
    return _seeded(lambda: PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                    out_channels=8, num_layers=1, cross_attention_dim=32,
                                                    sample_size=8, patch_size=2, caption_channels=24))


def _pixart_run(model):
    g = _inputs(4)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # padded caption: a key-padding mask
    x, text, t, text_mask = _place(model, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g),
                                   torch.tensor([10, 500]), text_mask)
    return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=text_mask,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def _tokens(seed: int, vocab: int = 1000):
    ids = torch.randint(3, vocab, (3, 9), generator=_inputs(seed))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded batch (right padding, as the tokenizers do)
    mask[2, 3:] = 0
    return ids, mask


def _clip_run(model):
    ids, mask = _place(model, *_tokens(5))
    out = model(input_ids=ids, attention_mask=mask)
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


def _clip_causal_run(model):  # no mask: the causal-only path (is_causal, mask None)
    (ids,) = _place(model, _tokens(6)[0])
    return model(input_ids=ids).last_hidden_state


def _bert_run(model):
    ids, mask = _place(model, *_tokens(7))
    return model(input_ids=ids, attention_mask=mask).logits


def _vit_build():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=3)
    return _seeded(lambda: ViTForImageClassification(config))


def _vit_run(model):
    (pixels,) = _place(model, torch.randn(2, 3, 16, 16, generator=_inputs(8)))
    return model(pixel_values=pixels).logits


MODELS = {
    # name: (build, run, attention layers, whether every layer runs the kernel under "triton")
    "unet-preset": (lambda: fastgen.load_component("tiny", "unet").model, _unet_run, 8, False),
    "unet": (lambda: _build("unet", attention_head_dim=2), _unet_run, 8, True),
    "vae": (lambda: fastgen.load_component("tiny", "vae-decoder").model, _vae_run, 2, True),
    "dit": (_dit_build, _dit_run, 1, True),
    "pixart": (_pixart_build, _pixart_run, 2, True),
    "clip": (lambda: _build("text-encoder", num_attention_heads=2), _clip_run, 2, True),
    "clip-causal": (lambda: _build("text-encoder", num_attention_heads=2), _clip_causal_run, 2, True),
    "bert": (lambda: _build("text-classifier"), _bert_run, 2, True),
    "vit": (_vit_build, _vit_run, 2, True),
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
    """Counts launches of the Triton kernel (the custom op calls ``_triton`` by its module-level name)."""
    calls = []
    real = attention_module._triton

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(attention_module, "_triton", spy)
    return calls


def _attention_state(model):
    """Processor objects and attn implementations: what restore must put back exactly."""
    state = {}
    for name, module in model.named_modules():
        if hasattr(module, "processor"):
            state[name] = module.processor
        if hasattr(module, STATE_ATTR):
            state[name + "#state"] = getattr(module, STATE_ATTR)
    config = getattr(model, "config", None)
    state["#impl"] = getattr(config, "_attn_implementation_internal", None)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_optimized_matches_and_restores(models, name, backend, kernel_calls, caplog):
    build, run, n_layers, kernel = MODELS[name]
    model = _model(models, name)
    before = _attention_state(model)
    with torch.no_grad():
        ref = run(model)
        strict = backend != "triton" or kernel  # the preset UNet's head dims 4/8 fall back to sdpa
        report = fastgen.optimize(model, attention=backend, strict=strict)
        assert len(report.layers) == n_layers and set(report.layers.values()) == {backend}
        assert not report.skipped
        with caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            out = run(model)
        torch.testing.assert_close(out, ref, **TOL)
        if backend == "triton":
            assert bool(kernel_calls) == kernel
            if not kernel:  # every call fell back, logged once per layer that ran
                assert caplog.records and all("head_dim" in r.getMessage() for r in caplog.records)
        restored = report.restore()
        assert restored.attention is None and not restored.layers and len(restored.restored) == n_layers
        assert _attention_state(model) == before
        assert all(a is b for a, b in zip(_attention_state(model).values(), before.values()))
        assert torch.equal(run(model), ref)


def test_fallback_logged_once_per_layer(models, kernel_calls, caplog):
    model = _model(models, "unet-preset")
    report = fastgen.optimize(model, "triton")
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            _unet_run(model)
            _unet_run(model)
        names = [r.getMessage().split()[2].rstrip(":") for r in caplog.records]
        assert sorted(names) == sorted(report.layers) and not kernel_calls  # 8 layers, each once
        assert all("running the sdpa path" in r.getMessage() for r in caplog.records)
    finally:
        report.restore()


def test_head_dim_512_falls_back_and_strict_raises(kernel_calls, caplog):
    # The SD VAE mid-block attention: one head of 512 channels, group norm, residual.
    attn = _seeded(lambda: Attention(query_dim=512, heads=1, dim_head=512, norm_num_groups=32, bias=True,
                                     residual_connection=True, upcast_softmax=True, _from_deprecated_attn_block=True))
    x = torch.randn(1, 512, 4, 4, generator=_inputs(9))
    with torch.no_grad():
        ref = attn(x)
        fastgen.optimize(attn, "triton")
        with caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            torch.testing.assert_close(attn(x), ref, **TOL)
        assert not kernel_calls and "head_dim 512" in caplog.text
        fastgen.optimize(attn, "triton", strict=True)
        with pytest.raises(UnsupportedError, match="'triton'.*head_dim 512"):
            attn(x)


def test_cpu_without_interpreter_falls_back(models, monkeypatch, kernel_calls, caplog):
    model = _model(models, "bert")
    monkeypatch.delenv("TRITON_INTERPRET")
    with torch.no_grad():
        ref = _bert_run(model)
        report = fastgen.optimize(model, "triton")
        with caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            torch.testing.assert_close(_bert_run(model), ref, **TOL)
        assert not kernel_calls and "device 'cpu'" in caplog.text
        fastgen.optimize(model, "triton", strict=True)
        with pytest.raises(UnsupportedError, match="'triton'.*device 'cpu'"):
            _bert_run(model)
        report.restore()


def test_mask_not_key_padding_runs_original(models, kernel_calls, caplog):
    # A bias that varies per query is no key-padding mask: the call runs the original (SDPA) exactly.
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 6, 32, generator=_inputs(10))
    bias = torch.randn(2, 6, 6, generator=_inputs(11))  # a real (soft) bias
    banded = torch.ones(6, 6, dtype=torch.bool).triu(-1).tril(1).expand(2, 6, 6)  # differs per query row
    with torch.no_grad():
        refs = [attn(x, attention_mask=m) for m in (bias, banded)]
        fastgen.optimize(attn, "triton")
        assert all(torch.equal(attn(x, attention_mask=m), r) for m, r in zip((bias, banded), refs))
        assert not kernel_calls
        fastgen.optimize(attn, "triton", strict=True)
        for mask, why in ((bias, "additive mask values other than 0"), (banded, "not key-padding")):
            with pytest.raises(UnsupportedError, match=f"'triton' cannot serve layer 'Attention': .*{why}"):
                attn(x, attention_mask=mask)
    # transformers: a custom 4-d mask passes through unchanged and falls back to sdpa for that call
    model = _model(models, "bert")
    ids, _ = _tokens(12)
    custom = torch.randn(3, 1, 9, 9, generator=_inputs(13))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=custom).logits
        report = fastgen.optimize(model, "triton")
        with caplog.at_level(logging.WARNING, logger="fastgen.ops.optimize"):
            assert torch.equal(model(input_ids=ids, attention_mask=custom).logits, ref)
        assert "additive mask values" in caplog.text and not kernel_calls
        report.restore()


def test_key_padding_from_mask():
    b, sq, sk = 2, 3, 4
    kp = torch.tensor([[True, True, True, True], [True, True, False, False]])
    bias = torch.zeros(b, 1, 1, sk).masked_fill(~kp[:, None, None, :], -10000.0)
    found, causal = key_padding_from_mask(bias.expand(b, 2, 1, sk), b, sq, sk, allow_causal=False)
    assert torch.equal(found, kp) and not causal
    assert key_padding_from_mask(torch.zeros(1, 1, 1, sk), b, sq, sk, allow_causal=False) == (None, False)
    tri = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)  # end-aligned causal
    found, causal = key_padding_from_mask(kp[:, None, None, :] & tri, b, sq, sk, allow_causal=True)
    assert torch.equal(found, kp) and causal
    assert isinstance(key_padding_from_mask(kp[:, None, None, :] & tri, b, sq, sk, allow_causal=False), str)
    assert "values" in key_padding_from_mask(bias - 5.0, b, sq, sk, allow_causal=False)  # -5 is a real bias
    dead = torch.zeros(b, 1, 1, sk, dtype=torch.bool)  # rows without keys: NaN/uniform in the original
    assert isinstance(key_padding_from_mask(dead, b, sq, sk, allow_causal=False), str)


def test_exclude_and_filter_fn(models):
    model = _model(models, "unet")
    originals = {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}
    with torch.no_grad():
        ref = _unet_run(model)
        report = fastgen.optimize(model, "reference", exclude=("*mid_block*",), filter_fn=lambda n, m: "attn2" not in n)
        kept = {n for n in originals if "mid_block" in n or n.endswith("attn2")}
        assert set(report.skipped) == kept and set(report.layers) == set(originals) - kept
        assert all("mid_block" not in n or "pattern '*mid_block*'" in why for n, why in report.skipped.items())
        for n, m in model.named_modules():
            if n in kept:
                assert m.processor is originals[n]
            elif n in originals:
                assert isinstance(m.processor, FastgenAttnProcessor) and m.processor.original is originals[n]
        torch.testing.assert_close(_unet_run(model), ref, **TOL)
        # Optimizing again with other exclusions: newly excluded layers go back, none is wrapped twice.
        again = fastgen.optimize(model, "sdpa", exclude="*up_blocks*")
        assert set(again.restored) == {n for n in originals if "up_blocks" in n and n not in kept}
        for n, m in model.named_modules():
            if n in originals and "up_blocks" not in n:
                assert type(m.processor.original) is AttnProcessor2_0 and m.processor.policy.backend == "sdpa"
        fastgen.optimize(model, attention=None)
        assert all(m.processor is originals[n] for n, m in model.named_modules() if n in originals)
        assert torch.equal(_unet_run(model), ref)


def test_transformers_exclude_eager_original_and_idempotence():
    model = _build("text-encoder", num_attention_heads=2)
    model.set_attn_implementation("eager")
    layer0 = dict(model.named_modules())["encoder.layers.0.self_attn"]
    with torch.no_grad():
        ref, ref_causal = _clip_run(model), _clip_causal_run(model)
        fastgen.optimize(model, "triton")
        report = fastgen.optimize(model, "reference", exclude=("*layers.0.*",))  # switch backend, exclude one
        assert model.config._attn_implementation == IMPLEMENTATION
        assert dict(report.layers) == {"encoder.layers.1.self_attn": "reference"}
        assert report.restored == ("encoder.layers.0.self_attn",)
        state = getattr(layer0, STATE_ATTR)
        assert state.policy is None and state.original == "eager"  # runs eager, with an eager (additive) mask
        torch.testing.assert_close(_clip_run(model), ref, **TOL)
        torch.testing.assert_close(_clip_causal_run(model), ref_causal, **TOL)  # eager given a causal mask
        fastgen.optimize(model, None)
        assert model.config._attn_implementation == "eager"
        assert not any(hasattr(m, STATE_ATTR) for m in model.modules())
        assert torch.equal(_clip_run(model), ref)


def test_state_is_per_model(models):
    a, b = _build("text-classifier"), _build("text-classifier")
    fastgen.optimize(a, "reference")
    assert a.config._attn_implementation == IMPLEMENTATION and b.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, STATE_ATTR) for m in b.modules())
    unet_a, unet_b = _build("unet", attention_head_dim=2), _build("unet", attention_head_dim=2)
    fastgen.optimize(unet_a, "sdpa")
    assert not any(isinstance(getattr(m, "processor", None), FastgenAttnProcessor) for m in unet_b.modules())
    fastgen.optimize([a, unet_a], None)
    assert a.config._attn_implementation == "sdpa"


def test_containers(models, tmp_path):
    from fastgen.engines.base import Engine
    from fastgen.engines.torch_backend import TorchEngine
    from fastgen.pipelines.generator import Generator
    from fastgen.pipelines.scorer import Scorer

    # a diffusers pipeline: its components
    unet2d = _seeded(lambda: UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                                         layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                         up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    pipe = DDPMPipeline(unet=unet2d, scheduler=DDPMScheduler())
    report = fastgen.optimize(pipe, "reference", strict=True)
    assert report.layers and all(n.startswith("unet.") for n in report.layers)
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 8, generator=_inputs(14))
        out = unet2d(x, 5).sample
        report.restore()
        torch.testing.assert_close(out, unet2d(x, 5).sample, **TOL)

    # a Component, a list, and a Generator / Scorer over torch engines
    comps = {c: fastgen.load_component("tiny", c) for c in ("unet", "vae-decoder", "text-encoder", "text-classifier")}
    report = fastgen.optimize(comps["unet"], "sdpa")
    assert set(report.layers) == {n for n, m in comps["unet"].model.named_modules() if isinstance(m, Attention)}
    report = fastgen.optimize([comps["unet"], comps["text-encoder"]], "sdpa")
    assert {n.split(".")[0] for n in report.layers} == {"0", "1"}
    engines = {c: TorchEngine(comp).attach(tokenizer=comp.tokenizer, metadata=comp.metadata)
               for c, comp in comps.items()}
    gen = Generator(unet=engines["unet"], vae_decoder=engines["vae-decoder"], text_encoder=engines["text-encoder"],
                    vae_encoder=lambda: None)
    report = fastgen.optimize(gen, "reference")
    assert {n.split(".")[0] for n in report.layers} == {"unet", "vae_decoder", "text_encoder"}
    assert "vae_encoder" in report.skipped
    scorer = Scorer(engines["text-classifier"])
    report = fastgen.optimize(scorer, "reference")
    # named by the key of Scorer.torch_modules(): the classifier's component name
    assert report.layers and all(n.startswith("text-classifier.bert.") for n in report.layers)
    fastgen.optimize([gen, scorer], None)
    assert all(not isinstance(getattr(m, "processor", None), FastgenAttnProcessor)
               for comp in comps.values() for m in comp.model.modules())

    class OrtLike(Engine):
        backend = "onnxruntime"

        def _run(self, inputs):
            raise AssertionError

    with pytest.raises(UnsupportedError, match="torch backend.*onnxruntime"):
        fastgen.optimize([comps["unet"], OrtLike(comps["unet"].spec)], "sdpa")
    # nothing half-done: the torch item before the engine was not touched
    assert not any(isinstance(getattr(m, "processor", None), FastgenAttnProcessor) for m in comps["unet"].model.modules())


def test_optimize_and_restore_bump_the_attention_revision(models):
    """What a torch engine's CUDA graphs compare to know they replay old kernels."""
    from fastgen.ops.optimize import attention_revision

    unet = _build("unet", attention_head_dim=2)
    assert attention_revision(unet) == 0
    report = fastgen.optimize(unet, "sdpa")
    assert attention_revision(unet) == 1
    report.restore()
    assert attention_revision(unet) == 2
    report.restore()  # nothing left to restore: no change, no new revision
    assert attention_revision(unet) == 2
    assert not any(name for name, _ in unet.named_buffers() if "revision" in name)


def test_any_holder_of_torch_modules(models):
    """The protocol: any object with ``torch_modules() -> {name: nn.Module}``; each module named by its key."""
    unet = _build("unet", attention_head_dim=2)

    class Holder:
        def torch_modules(self):
            return {"denoiser": unet}

    report = fastgen.optimize([Holder()], "sdpa")
    assert report.layers and all(n.startswith("0.denoiser.") for n in report.layers)
    report.restore()
    assert not any(isinstance(getattr(m, "processor", None), FastgenAttnProcessor) for m in unet.modules())

    class Elsewhere:
        backend = "tensorrt"

        def torch_modules(self):
            return {}

    with pytest.raises(UnsupportedError, match="torch backend.*Elsewhere.*tensorrt"):
        fastgen.optimize(Elsewhere(), "sdpa")

    class NotModules:
        def torch_modules(self):
            return {"unet": "a path"}

    with pytest.raises(InvalidArgumentError, match=r"torch_modules\(\)\['unet'\]"):
        fastgen.optimize(NotModules(), "sdpa")


def test_bad_arguments(models):
    model = _model(models, "dit")
    with pytest.raises(InvalidArgumentError, match="attention 'flash'.*triton, triton-int8, sdpa, reference, None"):
        fastgen.optimize(model, "flash")
    for kwargs in ({"exclude": [3]}, {"exclude": [""]}, {"filter_fn": "attn1"}, {"strict": "yes"}):
        with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
            fastgen.optimize(model, "sdpa", **kwargs)
    with pytest.raises(InvalidArgumentError, match="model 'int'"):
        fastgen.optimize(3, "sdpa")
    assert not any(isinstance(getattr(m, "processor", None), FastgenAttnProcessor) for m in model.modules())


def test_report_is_read_only(models):
    report = fastgen.optimize(_model(models, "dit"), "sdpa")
    try:
        assert isinstance(report, OptimizeReport) and "transformer_blocks.0.attn1: sdpa" in str(report)
        with pytest.raises(TypeError):
            report.layers["x"] = "triton"
        with pytest.raises(AttributeError):
            report.attention = "triton"
    finally:
        report.restore()


def test_unsupported_processor_is_skipped():
    attn = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor()).eval()
    sliced = Attention(query_dim=32, heads=2, dim_head=16).eval()
    from diffusers.models.attention_processor import SlicedAttnProcessor

    sliced.set_processor(SlicedAttnProcessor(1))
    x = torch.randn(2, 5, 32, generator=_inputs(15))
    with torch.no_grad():
        ref = attn(x)
        report = fastgen.optimize(torch.nn.ModuleDict({"plain": attn, "sliced": sliced}), "reference")
        assert dict(report.layers) == {"plain": "reference"} and "SlicedAttnProcessor" in report.skipped["sliced"]
        torch.testing.assert_close(attn(x), ref, **TOL)  # AttnProcessor's math (its attn.scale) kept
        report.restore()


def test_torch_compile_keeps_the_kernel(kernel_calls):
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(1, 8, 32, generator=_inputs(16))
    with torch.no_grad():
        ref = attn(x)
        fastgen.optimize(attn, "triton", strict=True)
        compiled = torch.compile(attn, backend="eager", dynamic=False)
        torch.testing.assert_close(compiled(x), ref, **TOL)
    assert kernel_calls


def test_torch_export_takes_the_original_path():
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    fastgen.optimize(attn, "triton", strict=True)
    program = torch.export.export(attn, (torch.randn(1, 8, 32),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("fastgen" in t for t in targets) and any("scaled_dot_product_attention" in t for t in targets)


EXPORTS = {
    "unet": (lambda: _build("unet", attention_head_dim=2), "batch=1:1:2,seq=7:7:7,height=32,width=32"),
    "text-classifier": (lambda: _build("text-classifier"), "batch=1:2:4,seq=1:9:16"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_parity(name, tmp_path):
    """fastgen export of an optimized model: the same ONNX graph and outputs as the unoptimized one."""
    import onnx
    import onnxruntime as ort

    from fastgen.export.api import export  # fastgen.export is shadowed by the subpackage once it is imported
    from fastgen.export.config import ExportConfig

    build, profile = EXPORTS[name]
    config = ExportConfig(verify="opt", cleanup="none", tolerance=1e-4)
    plain, fast = fastgen.adapt(build(), profile=profile), fastgen.adapt(build(), profile=profile)
    fastgen.optimize(fast, "triton", strict=True)
    a = export(plain, tmp_path / "plain", config=dataclasses.replace(config, verify="none"))
    b = export(fast, tmp_path / "fast", config=config)  # its verification ran the optimized model
    graph_a, graph_b = (onnx.load(str(r.onnx_path)).graph for r in (a, b))
    assert [n.op_type for n in graph_a.node] == [n.op_type for n in graph_b.node]
    feeds = {k: v.numpy() for k, v in plain.spec.sample_inputs("opt", seed=3).items()}
    outs = [ort.InferenceSession(str(r.onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for r in (a, b)]
    assert (outs[0] == outs[1]).all()


@pytest.mark.slow
def test_dynamo_export_of_optimized_model(tmp_path):
    import onnx

    from fastgen.export.api import export
    from fastgen.export.config import ExportConfig

    comp = fastgen.adapt(_build("text-classifier"), profile="batch=1:2:4,seq=1:9:16")
    fastgen.optimize(comp, "triton", strict=True)
    result = export(comp, tmp_path / "out", config=ExportConfig(exporter="dynamo", verify="opt"))
    graph = onnx.load(str(result.onnx_path)).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node) and result.verification


def test_triton_int8(models):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 16, 1, 16, dtype=torch.float16, device=device)
    try:
        attention(q, q, q, backend="triton-int8")
    except UnsupportedError as e:
        pytest.skip(f"triton-int8 is not usable here: {e}")
    model = _build("text-classifier").to(device, torch.float16)
    with torch.no_grad():
        ref = _bert_run(model).float()
        report = fastgen.optimize(model, "triton-int8", strict=True)
        out = _bert_run(model).float()
        report.restore()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cosine >= 0.999


def test_no_global_side_effects(models):
    threads, grad, dtype = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()
    report = fastgen.optimize(_model(models, "vit"), "triton")
    with torch.no_grad():
        _vit_run(_model(models, "vit"))
    report.restore()
    assert (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()) == (threads, grad, dtype)
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
def test_processor_features(processor, kernel_calls):
    """Spatial norm, 4-d input, norm_cross, q/k norm, rescale and residual through the processor."""
    attn = _seeded(lambda: Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True,
                                     rescale_output_factor=2.0, bias=True, processor=processor()))
    cross = _seeded(lambda: Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, qk_norm="layer_norm",
                                      cross_attention_norm="layer_norm", processor=processor()))
    g = _inputs(17)
    x, zq = torch.randn(2, 32, 4, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    h, ctx = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        refs = attn(x, temb=zq), cross(h, encoder_hidden_states=ctx)
        fastgen.optimize([attn, cross], "triton", strict=True)
        torch.testing.assert_close(attn(x, temb=zq), refs[0], **TOL)
        torch.testing.assert_close(cross(h, encoder_hidden_states=ctx), refs[1], **TOL)
    assert len(kernel_calls) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["unet", "vae", "dit", "pixart", "clip", "bert", "vit"])
def test_cuda_fp16_kernel(name, kernel_calls):
    """On the GPU in fp16 (run with TRITON_INTERPRET=0 for the compiled kernel): within 2x the error of the
    unoptimized fp16 model, both against the fp32 CPU model."""
    build, run, _, _ = MODELS[name]
    model = build()
    with torch.no_grad():
        ref = run(model).float()
        model = model.to("cuda", torch.float16)
        base = run(model).float().cpu()
        report = fastgen.optimize(model, "triton", strict=True)
        out = run(model).float().cpu()
    assert kernel_calls and report.layers
    err, err_base = (out - ref).abs().max().item(), (base - ref).abs().max().item()
    assert err <= 2 * err_base + 1e-3 * ref.abs().max().item(), (err, err_base)
