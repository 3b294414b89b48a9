"""LoRA files: every format read into the same factors and scales, mapped onto the pack's modules; bad LoRAs
refused with the reason, unmatched keys listed, a LoRA of another model named."""
import json
import logging
import math

import pytest
import torch
from glm_image_nodes.core.formats.lora_files import read_lora
from glm_image_nodes.core.formats.lora_targets import AR, COGVIEW4_DIT, GLM_IMAGE_DIT, linear_shapes, load_lora
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.testing.tiny_lora import (
    AR_TARGETS,
    DIT_TARGETS,
    lora_factors,
    target_shapes,
    write_diffusers_lora,
    write_kohya_lora,
    write_peft_adapter,
)
from glm_image_nodes.testing.tiny_release import write_tiny_release
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_tiny_release(str(tmp_path_factory.mktemp("release")))
    return load_ar_model(root, "fp32", "cpu"), load_decoder(root, "fp32", "cpu")


@pytest.fixture(scope="module")
def ar_factors(models):
    return lora_factors(target_shapes(models[0], AR, AR_TARGETS), rank=4)


@pytest.fixture(scope="module")
def dit_factors(models):
    return lora_factors(target_shapes(models[1], GLM_IMAGE_DIT, DIT_TARGETS), rank=4, seed=1)


def test_peft_adapter_onto_the_ar_model(models, ar_factors, tmp_path):
    folder = write_peft_adapter(str(tmp_path / "adapter"), ar_factors, r=4, alpha=8)
    lora = load_lora(folder, AR, models[0])
    assert lora.format == "PEFT adapter" and not lora.ignored
    assert set(lora.layers) == {n.removeprefix("model.language_model.") for n in ar_factors}
    layer = lora.layers["layers.1.self_attn.k_proj"]
    down, up = ar_factors["model.language_model.layers.1.self_attn.k_proj"]
    assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and layer.scale == 8 / 4
    # the weights file itself (the ComfyUI loras folder lists files) reads the config beside it
    assert read_lora(str(tmp_path / "adapter" / "adapter_model.safetensors")).layers.keys() == ar_factors.keys()
    # trained on the inner GlmImageModel: language_model.* without the leading model.
    inner = write_peft_adapter(str(tmp_path / "inner"), {k.removeprefix("model."): v for k, v in ar_factors.items()},
                               r=4, alpha=8)
    assert load_lora(inner, AR, models[0]).layers.keys() == lora.layers.keys()


def test_rslora_and_rank_alpha_patterns_follow_peft(models, ar_factors, tmp_path):
    factors = dict(ar_factors)
    o_proj = "model.language_model.layers.0.self_attn.o_proj"
    factors[o_proj] = lora_factors({o_proj: (64, 256)}, rank=2)[o_proj]
    folder = write_peft_adapter(str(tmp_path / "patterns"), factors, r=4, alpha=8,
                                rank_pattern={"layers.0.self_attn.o_proj": 2},
                                alpha_pattern={"layers.1.self_attn.q_proj": 3})
    lora = load_lora(folder, AR, models[0])
    assert lora.layers["layers.0.self_attn.o_proj"].scale == 8 / 2
    assert lora.layers["layers.1.self_attn.q_proj"].scale == 3 / 4
    assert lora.layers["layers.0.self_attn.q_proj"].scale == 8 / 4
    rs = write_peft_adapter(str(tmp_path / "rslora"), ar_factors, r=4, alpha=8, use_rslora=True)
    assert load_lora(rs, AR, models[0]).layers["layers.0.self_attn.v_proj"].scale == 8 / math.sqrt(4)
    wrong = write_peft_adapter(str(tmp_path / "wrong_rank"), ar_factors, r=8, alpha=8)
    with pytest.raises(CheckpointError, match="rank 4 in the weights but 8 in the adapter config"):
        read_lora(wrong)


@pytest.mark.parametrize("config, message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "LOHA"}, "a LOHA adapter, not a LoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_lora_variants_are_refused_with_the_reason(ar_factors, tmp_path, config, message):
    folder = write_peft_adapter(str(tmp_path / "variant"), ar_factors, r=4, alpha=8, **config)
    with pytest.raises(CheckpointError, match=message) as error:
        read_lora(folder)
    assert "merge_and_unload" in str(error.value)


def test_dora_tensors_are_refused(tmp_path):
    path = str(tmp_path / "dora.safetensors")
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2),
               "transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(64)}, path)
    with pytest.raises(CheckpointError, match=r"lora_magnitude_vector belongs to DoRA"):
        read_lora(path)


def test_target_modules_are_honoured(models, ar_factors, tmp_path, caplog):
    folder = write_peft_adapter(str(tmp_path / "targets"), ar_factors, r=4, alpha=8,
                                target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.v_proj"])
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        lora = load_lora(folder, AR, models[0])
    assert sorted(lora.layers) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                                   "layers.1.self_attn.q_proj"]
    assert len(lora.ignored) == 5 and "5 of its keys match nothing" in caplog.text


def test_diffusers_files_with_and_without_their_metadata(models, dit_factors, tmp_path):
    pipeline = write_diffusers_lora(str(tmp_path / "pipeline.safetensors"), dit_factors, r=4, alpha=2)
    lora = load_lora(pipeline, GLM_IMAGE_DIT, models[1])
    assert lora.format == "diffusers LoRA" and set(lora.layers) == set(dit_factors)
    assert {layer.scale for layer in lora.layers.values()} == {2 / 4}
    model_file = write_diffusers_lora(str(tmp_path / "bare.safetensors"), dit_factors, prefix="")
    assert {layer.scale for layer in load_lora(model_file, GLM_IMAGE_DIT, models[1]).layers.values()} == {1.0}


def test_kohya_keys_map_onto_the_pack_modules(models, dit_factors, ar_factors, tmp_path):
    path = write_kohya_lora(str(tmp_path / "kohya.safetensors"), dit_factors, alpha=2)
    lora = load_lora(path, GLM_IMAGE_DIT, models[1])
    assert lora.format == "kohya LoRA" and set(lora.layers) == set(dit_factors)
    down, up = dit_factors["transformer_blocks.1.ff.net.0.proj"]
    layer = lora.layers["transformer_blocks.1.ff.net.0.proj"]
    assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and layer.scale == 2 / 4
    no_alpha = write_kohya_lora(str(tmp_path / "no_alpha.safetensors"), ar_factors, alpha=None)
    ar = load_lora(no_alpha, AR, models[0])
    assert len(ar.layers) == len(ar_factors) and {layer.scale for layer in ar.layers.values()} == {1.0}


def test_unmatched_keys_are_listed_with_their_count(models, dit_factors, tmp_path, caplog):
    extra = lora_factors({"transformer_blocks.7.attn1.to_q": (64, 64), "patch_embed.text_proj": (64, 48)}, rank=4)
    path = write_diffusers_lora(str(tmp_path / "extra.safetensors"), {**dit_factors, **extra}, r=4, alpha=4)
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        lora = load_lora(path, GLM_IMAGE_DIT, models[1])
    assert len(lora.layers) == len(dit_factors)
    assert sorted(lora.ignored) == ["patch_embed.text_proj", "transformer_blocks.7.attn1.to_q"]
    assert "2 of its keys match nothing in the GLM-Image DiT decoder" in caplog.text
    assert "transformer_blocks.7.attn1.to_q" in caplog.text


def test_a_lora_of_another_model_says_which_it_seems_to_be_for(models, ar_factors, dit_factors, tmp_path):
    ar_lora = write_peft_adapter(str(tmp_path / "ar"), ar_factors, r=4, alpha=8,
                                 base_model_name_or_path="zai-org/GLM-Image")
    with pytest.raises(CheckpointError) as error:
        load_lora(ar_lora, GLM_IMAGE_DIT, models[1])
    message = str(error.value)
    assert "none of its 8 LoRA modules matches a layer of the GLM-Image DiT decoder" in message
    assert "seems to be for the GLM-Image AR model (GLM-Image AR LoRA Loader)" in message
    assert "base_model_name_or_path 'zai-org/GLM-Image'" in message
    dit_lora = write_diffusers_lora(str(tmp_path / "dit.safetensors"), dit_factors, r=4, alpha=4)
    with pytest.raises(CheckpointError, match="seems to be for a CogView4 or GLM-Image DiT"):
        load_lora(dit_lora, AR, models[0])
    flux = write_kohya_lora(str(tmp_path / "flux.safetensors"),
                            lora_factors({"double_blocks.0.img_attn.qkv": (96, 32)}, rank=2), alpha=2)
    with pytest.raises(CheckpointError, match="seems to be for FLUX"):
        load_lora(flux, COGVIEW4_DIT, models[1])


def test_bad_files_are_named(models, tmp_path):
    wrong_size = write_diffusers_lora(str(tmp_path / "big.safetensors"),
                                      lora_factors({"transformer_blocks.0.attn1.to_q": (4096, 4096)}, rank=2))
    with pytest.raises(CheckpointError, match=r"patches a 4096x4096 weight, but transformer_blocks.0.attn1.to_q .* "
                                              r"is 64x64.*another size"):
        load_lora(wrong_size, GLM_IMAGE_DIT, models[1])
    weights = str(tmp_path / "weights.safetensors")
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, weights)
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        read_lora(weights)
    half = str(tmp_path / "half.safetensors")
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, half)
    with pytest.raises(CheckpointError, match=r"proj_out has no up \(lora_B\) weight"):
        read_lora(half)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lora(str(tmp_path / "missing.safetensors"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        read_lora(str(tmp_path / "broken"))


def test_bin_adapters_load_with_weights_only(models, ar_factors, tmp_path):
    folder = tmp_path / "bin_adapter"
    write_peft_adapter(str(folder), ar_factors, r=4, alpha=4)
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / "adapter_model.safetensors")), str(folder / "adapter_model.bin"))
    (folder / "adapter_model.safetensors").unlink()
    lora = load_lora(str(folder), AR, models[0])
    assert lora.format == "PEFT adapter" and len(lora.layers) == len(ar_factors)
    assert set(linear_shapes(models[0])) >= set(lora.layers)
