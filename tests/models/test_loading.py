"""Loading local checkpoints offline, component selection errors, rebuild without pickle, digests."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastgen.errors import InvalidArgumentError, ModelNotFoundError, UnsupportedError
from fastgen.models import (
    adapt,
    load_component,
    model_components,
    rebuild_component,
    weights_digest,
)

TINY = model_components("tiny")


@pytest.fixture(scope="module")
def tiny():
    return {name: load_component("tiny", name) for name in TINY}


def _same_outputs(a, b, which="opt"):
    assert a.spec == b.spec
    x = a.spec.sample_inputs(which, seed=11)
    for (name, out), ref in zip(a(x).items(), b(x).values(), strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def pipeline_dir(tiny, tmp_path_factory):
    """A diffusers pipeline folder saved from the tiny preset (plus an SDXL-style second encoder)."""
    root = tmp_path_factory.mktemp("pipe")
    tiny["unet"].model.save_pretrained(root / "unet")
    tiny["vae-decoder"].model.save_pretrained(root / "vae")
    tiny["text-encoder"].model.save_pretrained(root / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir()  # folders fastgen does not load are ignored
    return root


def test_pipeline_folder(tiny, pipeline_dir):
    assert model_components(pipeline_dir) == ["unet", "vae-decoder", "vae-encoder", "text-encoder"]
    for name in model_components(pipeline_dir):
        comp = load_component(pipeline_dir, name)
        assert comp.name == name and comp.origin == str(pipeline_dir)
        _same_outputs(comp, tiny[name])
    with pytest.raises(InvalidArgumentError, match="unet, vae-decoder, vae-encoder, text-encoder"):
        load_component(pipeline_dir)
    with pytest.raises(InvalidArgumentError, match="text-encoder-2"):
        load_component(str(pipeline_dir), "text-encoder-2")


def test_pipeline_latent_factor_from_vae(tiny, tmp_path, tiny_clip_proj):
    """A VAE with three blocks (F = 4) makes the UNet's latents height/4; text_encoder_2 is found."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16), norm_num_groups=8, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 3,
                                      up_block_types=("UpDecoderBlock2D",) * 3)
    vae.save_pretrained(tmp_path / "vae")
    tiny["unet"].model.save_pretrained(tmp_path / "unet")
    tiny_clip_proj.save_pretrained(tmp_path / "text_encoder_2")
    (tmp_path / "model_index.json").write_text("{}")
    assert model_components(tmp_path) == ["unet", "vae-decoder", "vae-encoder", "text-encoder-2"]
    unet = load_component(tmp_path, "unet")
    assert unet.spec.inputs[0].shape == ("batch", 4, "height/4", "width/4")
    assert str(unet.spec.profile) == "batch=1:2:8,height=16:32:64,seq=77:77:154,width=16:32:64"  # 8 * 4 px
    assert load_component(tmp_path, "vae-encoder").spec.outputs[0].shape == ("batch", 4, "height/4", "width/4")
    te2 = load_component(tmp_path, "text-encoder-2")
    assert te2.name == "text-encoder-2" and te2.spec.output_names[-1] == "text_embeds"
    _same_outputs(te2, adapt(tiny_clip_proj, "text-encoder-2"))


def test_diffusers_model_folder(tiny, pipeline_dir):
    vae_dir = pipeline_dir / "vae"
    assert model_components(vae_dir) == ["vae-decoder", "vae-encoder"]
    with pytest.raises(InvalidArgumentError, match="vae-decoder, vae-encoder"):
        load_component(vae_dir)
    _same_outputs(load_component(vae_dir, "vae-encoder"), tiny["vae-encoder"])
    unet = load_component(pipeline_dir / "unet")  # one component: None is fine
    assert unet.name == "unet"
    _same_outputs(unet, tiny["unet"])


@pytest.mark.parametrize("name", ["text-classifier", "classifier", "text-encoder"])
def test_transformers_folder(tiny, tmp_path, name):
    tiny[name].model.save_pretrained(tmp_path)
    assert model_components(tmp_path) == [name]
    comp = load_component(tmp_path)
    assert comp.name == name and comp.origin == str(tmp_path)
    _same_outputs(comp, tiny[name])
    # Pointing at the config.json or at the weights file beside it loads the same folder.
    _same_outputs(load_component(tmp_path / "config.json"), comp)
    _same_outputs(load_component(tmp_path / "model.safetensors"), comp)


def test_text_classifier_alias_in_folder(tiny, tmp_path):
    tiny["text-classifier"].model.save_pretrained(tmp_path)
    assert load_component(tmp_path, "classifier").name == "text-classifier"


def test_bert_base_folder_is_text_encoder(tmp_path, tiny_bert):
    tiny_bert.save_pretrained(tmp_path)
    comp = load_component(tmp_path)
    assert comp.name == "text-encoder" and comp.spec.input_names == ["input_ids", "attention_mask"]
    _same_outputs(comp, adapt(tiny_bert))


@pytest.mark.parametrize("name", ["text-encoder", "vae-decoder", "unet", "classifier"])
def test_bare_safetensors_identified_by_keys(tiny, tmp_path, name):
    path = tmp_path / "weights.safetensors"
    save_file(tiny[name].model.state_dict(), str(path))
    components = model_components(path)
    assert name in components
    if name.startswith("vae"):
        assert components == ["vae-decoder", "vae-encoder"]
    comp = load_component(path, name)
    assert comp.origin == str(path)
    _same_outputs(comp, tiny[name])


def test_bare_safetensors_in_fp16_loads_as_float32(tiny, tmp_path):
    path = tmp_path / "te.safetensors"
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny["text-encoder"].model.state_dict().items()}
    save_file(state, str(path))
    comp = load_component(path)
    assert all(p.dtype == torch.float32 for p in comp.model.parameters())
    x = comp.spec.sample_inputs("opt")
    torch.testing.assert_close(comp(x)["last_hidden_state"], tiny["text-encoder"](x)["last_hidden_state"],
                               rtol=1e-2, atol=1e-2)


def test_unknown_safetensors(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"w": torch.zeros(3, 5)}, str(path))
    with pytest.raises(ModelNotFoundError) as err:
        load_component(path)
    message = str(err.value)
    assert "\n" not in message and "mystery.safetensors" in message and "sdxl/unet" in message


def test_hub_id_fails_at_once():
    with pytest.raises(ModelNotFoundError) as err:
        load_component("runwayml/stable-diffusion-v1-5", "unet")
    message = str(err.value)
    assert "\n" not in message
    assert "runwayml/stable-diffusion-v1-5" in message and "tiny, sd15, sdxl" in message
    assert "never downloads" in message
    with pytest.raises(ModelNotFoundError):
        model_components("stabilityai/sdxl-turbo")


def test_existing_paths_that_are_not_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        load_component(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        load_component(tmp_path / "notes.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelNotFoundError, match="bad.safetensors"):
        load_component(tmp_path / "bad.safetensors")


def test_pickled_weights_are_refused(tiny, tmp_path):
    tiny["unet"].model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UnsupportedError, match="safetensors"):
        load_component(tmp_path)


def test_unsupported_diffusers_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(UnsupportedError, match="UNet3DConditionModel"):
        model_components(tmp_path)


def test_component_selection_errors(tiny_cnn_factory):
    with pytest.raises(InvalidArgumentError, match="unet, vae-decoder") as err:
        load_component("tiny")
    assert err.value.argument == "component" and err.value.value is None
    with pytest.raises(InvalidArgumentError) as err:
        load_component("tiny", "refiner")
    assert err.value.argument == "component" and "text-classifier" in err.value.allowed
    with pytest.raises(InvalidArgumentError, match="text-encoder-2"):
        load_component("sd15", "text-encoder-2")
    comp = load_component(tiny_cnn_factory())  # a module: delegates to adapt
    assert comp.name == "classifier"


def test_profile_override():
    comp = load_component("tiny", "unet", profile="batch=1:4:16,height=64:64:256")
    assert str(comp.spec.profile) == "batch=1:4:16,height=64:64:256,seq=77:77:154,width=32:64:128"
    assert comp.source["adapter"]["profile"]["batch"] == {"min": 1, "opt": 4, "max": 16}
    with pytest.raises(InvalidArgumentError, match="profile"):
        load_component("tiny", "text-encoder", profile="height=64")


@pytest.mark.parametrize("name", TINY)
def test_rebuild_component(tiny, tmp_path, name):
    comp = tiny[name]
    source = json.loads(json.dumps(comp.source))  # what a manifest holds
    assert source["library"] in ("diffusers", "transformers") and source["adapter"]["component"] == name
    # The torch engine's round trip: the model's state dict through a safetensors file.
    path = tmp_path / "weights.safetensors"
    save_file(comp.model.state_dict(), str(path))
    before = torch.get_rng_state()
    rebuilt = rebuild_component(source, load_file(str(path)))
    assert torch.equal(torch.get_rng_state(), before)
    assert not any(p.is_meta for p in rebuilt.model.parameters())
    assert rebuilt.name == name and rebuilt.source == comp.source
    assert type(rebuilt.model) is type(comp.model)
    _same_outputs(rebuilt, comp, "min")
    _same_outputs(rebuilt, comp, "max")


def test_rebuild_keeps_profile_and_dtype(tiny):
    comp = load_component("tiny", "text-encoder", profile="batch=2:4:6")
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in comp.model.state_dict().items()}
    rebuilt = rebuild_component(comp.source, state)
    assert rebuilt.spec.profile == comp.spec.profile
    assert all(p.dtype == torch.bfloat16 for p in rebuilt.model.parameters())


def test_rebuild_refuses_classes_outside_the_allowlist(tiny):
    good = tiny["unet"].source
    state = tiny["unet"].model.state_dict()
    for library, cls in [("diffusers", "DiffusionPipeline"), ("diffusers", "DDIMScheduler"),
                         ("transformers", "AutoModel"), ("transformers", "CLIPTextConfig"),
                         ("transformers", "pipeline"), ("diffusers", "__class__"), ("torch", "Linear"),
                         ("builtins", "eval")]:
        with pytest.raises(UnsupportedError):
            rebuild_component({**good, "library": library, "class": cls}, state)
    with pytest.raises(UnsupportedError, match="custom nn.Module"):
        rebuild_component({}, {})
    with pytest.raises(InvalidArgumentError, match="source"):
        rebuild_component({"library": "diffusers"}, state)
    state = dict(state)
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="Missing key"):
        rebuild_component(good, state)


def _manual_digest(model: torch.nn.Module) -> str:
    """Independent reference: the documented layout, hashed by hand through numpy copies."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def test_weights_digest():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    digest = weights_digest(model)
    assert digest == _manual_digest(model) == weights_digest(copy.deepcopy(model))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[2, 1] += 1e-6
    assert weights_digest(changed) != digest
    renamed = torch.nn.Sequential(torch.nn.Identity(), *model)  # same tensors under other names
    assert weights_digest(renamed) != digest
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_digest(bf16) == _manual_digest(bf16) != digest
    # A non-contiguous parameter hashes as its logical contents.
    transposed = copy.deepcopy(model)
    transposed[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    assert not transposed[0].weight.is_contiguous()
    assert weights_digest(transposed) == digest


@pytest.mark.parametrize(("name", "weights"), [("unet", "diffusion_pytorch_model.safetensors"),
                                               ("text-encoder", "model.safetensors")])
def test_corrupt_weights_give_one_line(tiny, tmp_path, name, weights):
    tiny[name].model.save_pretrained(tmp_path)
    (tmp_path / weights).write_bytes(b"garbage")
    with pytest.raises(ModelNotFoundError) as err:
        load_component(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_pipeline_skips_unsupported_folders(tiny, tmp_path, caplog):
    tiny["unet"].model.save_pretrained(tmp_path / "unet")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    (tmp_path / "model_index.json").write_text("{}")
    assert model_components(tmp_path) == ["unet"]
    assert "AutoencoderTiny" in caplog.text


def test_meta_parameter_patch_acts_only_in_the_building_thread():
    import threading

    from torch import nn

    from fastgen.models.loading import _parameters_on_meta

    seen = {}
    with _parameters_on_meta():
        seen["builder"] = nn.Linear(2, 2).weight.device.type
        worker = threading.Thread(target=lambda: seen.__setitem__("other", nn.Linear(2, 2).weight.device.type))
        worker.start()
        worker.join()
    seen["after"] = nn.Linear(2, 2).weight.device.type
    assert seen == {"builder": "meta", "other": "cpu", "after": "cpu"}


def test_read_json_is_strict_for_a_models_config_and_lenient_for_extras(tmp_path):
    from fastgen.models.assets import read_json

    good, bad, array = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "array.json"
    good.write_text('{"a": 1}', encoding="utf-8")
    bad.write_text("{not json", encoding="utf-8")
    array.write_text("[1, 2]", encoding="utf-8")
    assert read_json(good) == read_json(good, required=True) == {"a": 1}
    assert read_json(bad) == read_json(array) == read_json(tmp_path / "missing.json") == {}
    assert read_json(array, expect=list) == [1, 2] and read_json(good, expect=list) == []
    with pytest.raises(ModelNotFoundError, match="bad.json: unreadable JSON"):
        read_json(bad, required=True)
    with pytest.raises(ModelNotFoundError, match="array.json: expected a JSON object"):
        read_json(array, required=True)
