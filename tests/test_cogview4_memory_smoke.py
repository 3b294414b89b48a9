"""The CogView4 memory measurement (benchmarks/cogview4_memory.py) in its tiny mode on the CPU.

No memory or timing is asserted (there is no GPU here): only that every node stage runs and is recorded, that
the image has the requested shape, and that the in-memory stand-ins for the loaders return exactly what the
real loader nodes return for the same release written to disk.
"""
import json
import math
import os
import shutil

import pytest
import torch
from benchmark_scripts import load_benchmark
from glm_image_nodes.nodes.loaders.cogview4 import (
    GLMImageCogView4DecoderLoader,
    GLMImageCogView4TextEncoderLoader,
)
from glm_image_nodes.nodes.loaders.glm_image import GLMImageVAELoader
from glm_image_nodes.testing.tiny_glm4_tokenizer import write_tiny_glm4_tokenizer
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def memory():
    return load_benchmark("cogview4_memory")


def test_tiny_run_records_every_stage_and_makes_the_image(memory, tmp_path):
    out = tmp_path / "results.json"
    report = memory.main(["--size", "tiny", "--device", "cpu", "--height", "512", "--width", "576",
                          "--prompt-tokens", "48", "--negative-tokens", "16", "--dtype", "fp32", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    assert list(report["stages"]) == list(memory.STAGES)
    for name, stage in report["stages"].items():
        assert stage["node"] == memory.STAGES[name]
        assert math.isfinite(stage["time_s"]) and stage["time_s"] >= 0
        assert stage["peak_gib"] is stage["peak_reserved_gib"] is stage["allocated_after_gib"] is None
        assert f"| {name} | {stage['node']} |" in report["table"]
    assert report["overall_peak_gib"] is None and report["fits_24_gib"] is None
    assert report["meta"]["mem_get_info_start_gib"] is None
    assert report["meta"]["torch"] and report["meta"]["date"] and report["meta"]["device_name"]

    sizes = report["sizes"]
    assert sizes["image_shape"] == [1, 512, 576, 3]
    assert sizes["latent_shape"] == [1, 16, 64, 72]
    assert (sizes["prompt_tokens"], sizes["negative_tokens"]) == (48, 16)  # different lengths: CFG as 2 forwards
    for name, model in report["models"].items():
        assert model["params"] > 0 and model["dtype"] == "float32", name  # fp32: bf16 is slow without AVX512-BF16
        assert model["device_after_run"] == "cpu", name


def test_prompt_of_tokens_fills_exactly_up_to_the_length(memory, tmp_path):
    tokenizer = memory.load_cogview4_tokenizer(write_tiny_glm4_tokenizer(str(tmp_path)))
    for tokens in (2, 17, 100, 1024):
        prompt = memory.prompt_of_tokens(tokenizer, tokens, memory.PROMPT)
        words = prompt.split()
        following = memory.PROMPT.split()[len(words) % len(memory.PROMPT.split())]
        ids = tokenizer.tokenizer.encode(prompt).ids
        longer = tokenizer.tokenizer.encode(" ".join(words + [following])).ids
        assert len(ids) <= tokens < len(longer), tokens


def write_release(root, memory, text_encoder, decoder, vae) -> str:
    """The stand-ins' weights and the tiny configs in the release layout, as the real loaders read it."""
    configs = memory.release_configs("tiny")
    text_encoder_state = {"model." + k: v for k, v in text_encoder.model.state_dict().items()}
    parts = {"text_encoder": ("model.safetensors", text_encoder_state),
             "transformer": ("diffusion_pytorch_model.safetensors", decoder.model.state_dict()),
             "vae": ("diffusion_pytorch_model.safetensors", vae.module.state_dict())}
    for name, (file, state) in parts.items():
        os.makedirs(os.path.join(root, name))
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(root, name, file))
        with open(os.path.join(root, name, "config.json"), "w") as f:
            json.dump(configs[name], f)
    shutil.copytree(os.path.join(memory.CONFIGS, "scheduler"), os.path.join(root, "scheduler"))
    write_tiny_glm4_tokenizer(os.path.join(root, "tokenizer"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "CogView4Pipeline"}, f)
    return root


def assert_same_module(built: torch.nn.Module, loaded: torch.nn.Module) -> None:
    assert type(built) is type(loaded)
    a, b = built.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
    assert not any(p.requires_grad for p in built.parameters()) and not built.training


def test_in_memory_loaders_return_what_the_loader_nodes_return(memory, tmp_path):
    configs = memory.release_configs("tiny")
    text_encoder = memory.text_encoder_loader(configs, write_tiny_glm4_tokenizer(str(tmp_path / "tok")),
                                              torch.bfloat16, seed=3)
    decoder = memory.decoder_loader(configs, torch.bfloat16, seed=3)
    vae = memory.vae_loader(configs, torch.bfloat16, seed=3)
    root = write_release(str(tmp_path / "CogView4-tiny"), memory, text_encoder, decoder, vae)

    (loaded_text_encoder,) = GLMImageCogView4TextEncoderLoader().load(root, "bf16")
    (loaded_decoder,) = GLMImageCogView4DecoderLoader().load(root, "bf16")
    (loaded_vae,) = GLMImageVAELoader().load(root, "bf16", family="cogview4")

    assert type(text_encoder) is type(loaded_text_encoder)
    assert_same_module(text_encoder.model, loaded_text_encoder.model)
    assert text_encoder.model.config == loaded_text_encoder.model.config
    prompt = 'a cat on a table, "hello world"'
    assert text_encoder.tokenizer.encode(prompt) == loaded_text_encoder.tokenizer.encode(prompt)
    assert text_encoder.tokenizer.pad_token_id == loaded_text_encoder.tokenizer.pad_token_id

    assert text_encoder.blocks == loaded_text_encoder.blocks
    assert type(decoder) is type(loaded_decoder)
    assert_same_module(decoder.model, loaded_decoder.model)
    assert decoder.model.config == loaded_decoder.model.config
    assert decoder.shift_settings == loaded_decoder.shift_settings and decoder.blocks == loaded_decoder.blocks

    assert type(vae) is type(loaded_vae)
    vae, loaded_vae = vae.model, loaded_vae.model
    assert_same_module(vae.model, loaded_vae.model)
    assert (vae.scaling_factor, vae.shift_factor) == (loaded_vae.scaling_factor, loaded_vae.shift_factor) == (1.0, 0.0)
    assert vae.latents_mean is loaded_vae.latents_mean is None


def test_full_configs_have_the_parameter_counts_of_the_readme(memory):
    """The real configs, built on the meta device: the figures the README's memory plan is based on."""
    configs = memory.release_configs("full")
    with torch.device("meta"):
        text_encoder, decoder, vae = (memory.make_text_encoder(configs), memory.make_decoder(configs),
                                      memory.make_vae(configs))
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("text_encoder", text_encoder), ("transformer", decoder), ("vae", vae))}
    assert len(text_encoder.layers) == 39  # of 40: CogView4 reads hidden_states[-2]
    assert params == {"text_encoder": 8_575_229_440, "transformer": 6_369_118_272, "vae": 406_100_643}
