"""Weight files made the way other tools make them: read by the loaders and accepted by convert.py.

Each ``make_*`` function below does what the other tool does to a state dict (named in its docstring); none of
them is the pack's own writer.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.formats import ggml
from glm_image_nodes.core.formats.checkpoint import open_checkpoint
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.core.models.t5_encoder import load_glyph_encoder
from glm_image_nodes.testing.tiny_release import write_tiny_release
from safetensors.torch import load_file, save_file

DIT_KEYS_QUANTIZED_BY_KIJAI = (".attn1.", ".ff.")  # his FP8 scripts cast the blocks' linear weights


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("others") / "tiny"))


def dit_state(release) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(release, "transformer", "diffusion_pytorch_model.safetensors"))


def beside_config(release, folder) -> None:
    """A single file's folder with the release's config.json (the tiny DiT's head_dim is not in its shapes)."""
    shutil.copy(os.path.join(release, "transformer", "config.json"), os.path.join(folder, "config.json"))


def make_kijai_fp8(state: dict[str, torch.Tensor], fp8_dtype: torch.dtype, e5m2_too: bool = False):
    """kijai's ``*_fp8_e4m3fn.safetensors``: the blocks' 2-D linear weights cast with ``.to(torch.float8_e4m3fn)``
    (no scales, no marker), everything else left in bf16; ``e5m2_too``: every other such weight float8_e5m2."""
    out, casts = {}, 0
    for key, value in state.items():
        if value.dim() == 2 and key.endswith(".weight") and any(p in key for p in DIT_KEYS_QUANTIZED_BY_KIJAI):
            out[key] = value.to(torch.float8_e5m2 if e5m2_too and casts % 2 else fp8_dtype)
            casts += 1
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def make_comfyui_checkpoint(state: dict[str, torch.Tensor], prefix: str, extra: dict | None = None):
    """ComfyUI's savers: ``comfy.utils.state_dict_prefix_replace(sd, {"": prefix})``, other parts added as they are."""
    return {**{prefix + k: v for k, v in state.items()}, **(extra or {})}


def make_city96_gguf(path: str, state: dict[str, torch.Tensor], qtype: str = "Q8_0", reshape: str | None = None):
    """city96 ``tools/convert.py`` + llama-quantize: tensor names as in the state dict, ``general.architecture``
    from its own model list, quantization version and file type, every 2-D tensor quantized (``proj_out``
    included), 1-D in F32; ``reshape``: one tensor stored flattened to 2-D with ``comfy.gguf.orig_shape.<key>``."""
    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(path, "cogview4")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in state.items():
        data = value.float().numpy()
        if key == reshape:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
            data = data.reshape(-1, data.shape[-1] if data.ndim > 1 else 8)
        if data.ndim == 2 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0 and key != reshape:
            writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g),
            torch.randint(0, 64, (1, 16), generator=g), False, torch.tensor([420.0]),
            torch.tensor([[64.0, 64.0]]), torch.tensor([[0.0, 0.0]]))


def run(dit):
    with torch.no_grad():
        return dit(*inputs())


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.fixture(scope="module")
def reference(release):
    return run(load_decoder(release, "fp32", "cpu"))


# ---- unscaled FP8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8_dtype,e5m2_too", [(torch.float8_e4m3fn, False), (torch.float8_e5m2, False),
                                                (torch.float8_e4m3fn, True)])
def test_unscaled_fp8_files_load_with_their_exact_weights(release, reference, tmp_path, fp8_dtype, e5m2_too):
    state = make_kijai_fp8(dit_state(release), fp8_dtype, e5m2_too)
    path = str(tmp_path / "glm_image_dit_fp8.safetensors")
    save_file(state, path)
    beside_config(release, tmp_path)
    dit = load_decoder(path, "fp32", "cpu")
    q = dit.transformer_blocks[0].attn1.to_q
    stored = state["transformer_blocks.0.attn1.to_q.weight"]
    assert torch.equal(q.compute_weight(torch.device("cpu")), stored.float())   # scale 1: the plain cast
    if stored.dtype == torch.float8_e4m3fn:
        assert q.weight_kind == "fp8" and q.weight.dtype == torch.float8_e4m3fn  # stays 1 byte per weight
    assert dit.dtype == torch.float32
    assert cosine(run(dit), reference) > 0.99
    if fp8_dtype == torch.float8_e4m3fn:
        assert "unscaled" in open_checkpoint(path).format_name


# ---- ComfyUI prefixes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfyui_prefixed_dit_loads_with_one_log_line(release, reference, tmp_path, caplog, prefix):
    path = str(tmp_path / "dit.safetensors")
    save_file(make_comfyui_checkpoint(dit_state(release), prefix), path)
    beside_config(release, tmp_path)
    with caplog.at_level(logging.INFO, logger="glm_image_nodes"):
        dit = load_decoder(path, "fp32", "cpu")
    said = [r.getMessage() for r in caplog.records if "ComfyUI's prefix" in r.getMessage()]
    assert len(said) == 1 and repr(prefix) in said[0]
    assert torch.equal(run(dit), reference)


def test_all_in_one_checkpoint_gives_each_loader_its_part(release, reference, tmp_path):
    glyph = load_file(os.path.join(release, "text_encoder", "model.safetensors"))
    extra = {"text_encoders.byt5.transformer." + k: v for k, v in glyph.items()}
    extra["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    path = str(tmp_path / "all_in_one.safetensors")
    save_file(make_comfyui_checkpoint(dit_state(release), "model.diffusion_model.", extra), path)
    beside_config(release, tmp_path)
    assert torch.equal(run(load_decoder(path, "fp32", "cpu")), reference)
    shutil.copy(os.path.join(release, "text_encoder", "config.json"), tmp_path / "config.json")
    encoder = load_glyph_encoder(path, "fp32", "cpu")
    want = load_glyph_encoder(release, "fp32", "cpu").state_dict()
    assert all(torch.equal(v, want[k]) for k, v in encoder.state_dict().items())


# ---- city96 GGUFs ------------------------------------------------------------------------------------------
def test_city96_gguf_with_every_2d_weight_quantized_runs(release, reference, tmp_path):
    state = dit_state(release)
    path = str(tmp_path / "glm_image_dit-Q8_0.gguf")
    make_city96_gguf(path, state, reshape="proj_out.bias")
    beside_config(release, tmp_path)
    dit = load_decoder(path, "fp32", "cpu")
    assert dit.proj_out.weight_kind == "Q8_0" and dit.dtype == torch.float32   # not the packed uint8
    assert torch.equal(dit.proj_out.bias, state["proj_out.bias"].float())       # orig_shape restored
    assert cosine(run(dit), reference) > 0.999


def test_city96_gguf_of_the_ar_model_runs(release, tmp_path):
    """The AR's lm_head (kept in bf16 by convert.py) packed as Q8_0 too: the model's dtype stays float32."""
    from glm_image_nodes.core.models.glm_ar import load_ar_model

    folder = os.path.join(release, "vision_language_encoder")
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    path = str(tmp_path / "glm_image_ar-Q8_0.gguf")
    make_city96_gguf(path, state)
    model = load_ar_model(path, "fp32", "cpu")
    assert model.lm_head.weight_kind == "Q8_0" and model.dtype == torch.float32
    ref = load_ar_model(release, "fp32", "cpu")
    ids = torch.randint(0, 16512, (1, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(8).view(1, 1, 8).expand(3, 1, 8)
    with torch.no_grad():
        want, got = ref(ids, pos, ref.new_cache(1, 8), 0), model(ids, pos, model.new_cache(1, 8), 0)
    assert cosine(got, want) > 0.999


def test_orig_shape_that_does_not_fit_is_named(release, tmp_path):
    path = str(tmp_path / "bad.gguf")
    writer = gguf.GGUFWriter(path, "cogview4")
    writer.add_array("comfy.gguf.orig_shape.proj_out.bias", [3, 5])
    writer.add_tensor("proj_out.bias", np.zeros(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"orig_shape.proj_out.bias says \(3, 5\) but the tensor holds 64"):
        open_checkpoint(path)


# ---- GGUF types only llama-quantize writes -------------------------------------------------------------------
READ_ONLY = {"Q3_K": [108], "Q2_K": [80, 82], "IQ4_NL": [0], "IQ4_XS": [0]}  # offsets of their float16 scales


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_llama_quantize_types_dequantize_bit_identical_to_gguf(name):
    """Random bytes exercise every packed bit; only the float16 scale fields are made finite."""
    qtype = ggml.QTYPES[name]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype.id)] == (qtype.block_size, qtype.type_size)
    rows = 64
    blocks = torch.randint(0, 256, (rows, qtype.type_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    finite = torch.randn(rows, len(READ_ONLY[name])).to(torch.float16).view(torch.uint8).reshape(rows, -1)
    for i, offset in enumerate(READ_ONLY[name]):
        blocks[:, offset:offset + 2] = finite[:, 2 * i:2 * i + 2]
    shape = (4, rows // 4 * qtype.block_size)
    ours = ggml.dequantize(blocks, qtype, shape).numpy()
    theirs = gguf.quants.dequantize(blocks.reshape(4, -1).numpy(), gguf.GGMLQuantizationType(qtype.id))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# ---- convert.py takes every one of them -------------------------------------------------------------------
def made_files(release, folder) -> dict[str, str]:
    state = dit_state(release)
    files = {"kijai_fp8_e4m3fn": make_kijai_fp8(state, torch.float8_e4m3fn),
             "fp8_mixed_e5m2": make_kijai_fp8(state, torch.float8_e4m3fn, e5m2_too=True),
             "comfyui_prefixed": make_comfyui_checkpoint(state, "model.diffusion_model.")}
    paths = {}
    for name, tensors in files.items():
        paths[name] = os.path.join(folder, f"{name}.safetensors")
        save_file(tensors, paths[name])
    paths["city96_q8_0"] = os.path.join(folder, "city96_q8_0.gguf")
    make_city96_gguf(paths["city96_q8_0"], state, reshape="proj_out.bias")
    beside_config(release, folder)
    return paths


@pytest.mark.parametrize("fmt", ["q8_0", "fp8_e4m3fn"])
def test_convert_accepts_other_tools_files(release, reference, tmp_path, fmt):
    import convert

    made = made_files(release, str(tmp_path))
    for name, path in made.items():
        out = str(tmp_path / f"{name}_to_{fmt}{conversion.extension(fmt)}")
        assert convert.main([path, "--format", fmt, "--out", out]) == 0, name
        dit = load_decoder(out, "fp32", "cpu")    # the embedded config: no config.json needed any more
        assert cosine(run(dit), reference) > 0.99, name
    assert json.loads(open_checkpoint(out).metadata["glm_image_nodes.config"])["num_layers"] == 2
