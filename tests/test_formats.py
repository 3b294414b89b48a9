"""Weight formats: GGML dequantization bit-identical to the gguf package, quantizer accuracy, FP8, the pack's
layer with its patch hook, and FP8 / GGUF files converted from the tiny release read back by the loaders."""
import logging
import os

import gguf
import numpy as np
import pytest
import torch
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.formats import fp8, ggml
from glm_image_nodes.core.formats.checkpoint import open_checkpoint
from glm_image_nodes.core.formats.layers import Packed, adopt
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models import glm_ar, glm_image_dit, t5_encoder
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.core.models.t5_encoder import load_glyph_encoder
from glm_image_nodes.testing.layer_kinds import describe
from glm_image_nodes.testing.tiny_release import write_tiny_release

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_0")
# relative Frobenius error of quantize -> dequantize on ``gaussian_rows`` (measured: F16 2.1e-4, BF16 1.6e-3,
# Q8_0 0.0053, Q6_K 0.017, Q5_K 0.036, Q5_1 0.037, Q5_0 0.040, Q4_K 0.069, Q4_0 0.088; bounds ~25 % above)
MAX_ERROR = {"F32": 0, "F16": 3e-4, "BF16": 2e-3, "Q8_0": 0.0066, "Q6_K": 0.021, "Q5_K": 0.045, "Q5_1": 0.047,
             "Q5_0": 0.05, "Q4_K": 0.086, "Q4_0": 0.11}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("formats") / "tiny"))


def gaussian_rows(rows=24, width=512):
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3] = 0                      # an all-zero block
    w[5, :256] = 0.7              # a constant block
    w[7] *= 40                    # a large-magnitude row
    return w


READ_ONLY = ("Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")  # llama-quantize's; tested in test_other_tools_files.py


def test_type_table_matches_gguf():
    assert set(ggml.QTYPES) == set(SUPPORTED) | set(READ_ONLY)
    for name, q in ggml.QTYPES.items():
        kind = gguf.GGMLQuantizationType(q.id)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (q.block_size, q.type_size)


@pytest.mark.parametrize("name", SUPPORTED)
def test_dequantize_is_bit_identical_to_gguf(name):
    qtype = ggml.QTYPES[name]
    w = gaussian_rows()
    packed = ggml.quantize(w, qtype)
    ours = ggml.dequantize(packed, qtype, tuple(w.shape)).numpy()
    theirs = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType(qtype.id)).reshape(w.shape)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    err = ((torch.from_numpy(ours) - w).norm() / w.norm()).item()
    assert err <= MAX_ERROR[name], err


@pytest.mark.parametrize("name", [n for n in SUPPORTED if ggml.QTYPES[n].block_size > 1])
def test_dequantize_every_bit_pattern_like_gguf(name):
    """Random bytes exercise every packed bit (the quantizers never write some, e.g. the high scale bits); only
    the float16 scale fields are made finite."""
    qtype = ggml.QTYPES[name]
    blocks = torch.randint(0, 256, (64, qtype.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fields = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    finite = torch.randn(64, len(fields[name])).to(torch.float16).view(torch.uint8).reshape(64, -1)
    for i, offset in enumerate(fields[name]):
        blocks[:, offset:offset + 2] = finite[:, 2 * i:2 * i + 2]
    shape = (2, 32 * qtype.block_size)
    ours = ggml.dequantize(blocks, qtype, shape).numpy()
    theirs = gguf.quants.dequantize(blocks.reshape(2, -1).numpy(), gguf.GGMLQuantizationType(qtype.id))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_k_quants_beat_the_legacy_types_of_their_size():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4))

    def error(name):
        q = ggml.QTYPES[name]
        return ((ggml.dequantize(ggml.quantize(w, q), q, tuple(w.shape)) - w).norm() / w.norm()).item()

    assert error("Q4_K") < 0.9 * error("Q4_0") and error("Q5_K") < 0.9 * error("Q5_0")


def test_k_quants_fall_back_for_rows_that_are_not_multiples_of_256():
    assert ggml.qtype_for_row("Q4_K", 13696).name == "Q5_0"     # GLM-4's MLP down projection
    assert ggml.qtype_for_row("Q5_K", 1472).name == "Q5_1"      # Glyph-ByT5's width
    assert ggml.qtype_for_row("Q6_K", 384).name == "Q8_0"
    assert ggml.qtype_for_row("Q4_K", 4096).name == "Q4_K"


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_fp8_quantization(granularity):
    w = gaussian_rows()
    q, scale = fp8.quantize(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (() if granularity == "tensor" else (24, 1))
    back = fp8.dequantize(q, scale, torch.float32)
    assert back[3].abs().max() == 0
    err = ((back - w).norm() / w.norm()).item()
    assert err < 0.035, err  # e4m3 keeps 3 mantissa bits: ~2.5 % relative error whatever the scaling
    if granularity == "channel":  # each row uses the full range: its largest value maps to 448
        assert torch.allclose(q.float().abs().amax(1)[w.abs().amax(1) > 0], torch.tensor(448.0))


def test_fp8_scaled_mm_matches_the_dequantized_weight():
    """The FP8 GEMM path (used on GPUs of compute capability 8.9+; CPU torch runs it too) against dequantizing."""
    w = torch.randn(48, 64) * 0.1
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    bias = torch.randn(48)
    for granularity in fp8.GRANULARITIES:
        for rowwise in (True, False):  # Hopper+ scales per row / column; Ada takes scalar scales
            q, scale = fp8.quantize(w, granularity)
            fast = fp8.scaled_mm_linear(x, q, scale, bias, rowwise=rowwise)
            exact = torch.nn.functional.linear(x.float(), fp8.dequantize(q, scale, torch.float32), bias)
            assert fast.shape == (2, 5, 48) and fast.dtype == torch.bfloat16
            rel = ((fast.float() - exact).norm() / exact.norm()).item()
            assert rel < 0.05, (granularity, rowwise, rel)  # the activations are quantized to e4m3 too


def linear_layer(packed, bias=True, dtype=torch.float32):
    with torch.device("meta"):
        layer = torch.nn.Linear(packed.shape[1], packed.shape[0], bias=bias)
    adopt(layer, dtype)
    layer.assign_weight(packed, torch.device("cpu"))
    if bias:
        layer.bias = torch.nn.Parameter(torch.zeros(packed.shape[0]), requires_grad=False)
    return layer


def test_packed_linear_and_its_patch_hook():
    w = torch.randn(64, 256) * 0.05
    qtype = ggml.QTYPES["Q4_K"]
    layer = linear_layer(Packed(ggml.quantize(w, qtype), "Q4_K", (64, 256)))
    dense = ggml.dequantize(ggml.quantize(w, qtype), qtype, (64, 256))
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, layer.bias))
    assert layer.weight.dtype == torch.uint8 and layer.weight_shape == (64, 256)

    down, up = torch.randn(4, 256) * 0.1, torch.randn(64, 4) * 0.1   # a rank-4 LoRA
    layer.add_weight_patch(lambda weight: weight + 0.5 * (up @ down))
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, dense + 0.5 * (up @ down)), atol=1e-6)
    layer.weight_patches.clear()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, layer.bias))
    layer.add_weight_patch(lambda weight: weight[:, :8])
    with pytest.raises(ValueError, match="must keep the shape"):
        layer(x)


def test_comfyui_weight_functions_never_touch_the_stored_weight():
    """ComfyUI's low-VRAM LoRA patches (``weight_function``) add in place: a plain weight is copied for them."""
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    layer = linear_layer(w.clone())
    layer.weight_function = [lambda weight: weight.add_(1.0)]
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w + 1.0, layer.bias))
    assert torch.equal(layer.weight, w)


@pytest.mark.parametrize("kind, stored, dtype", [("BF16", torch.bfloat16, torch.bfloat16),
                                                  ("F32", torch.float32, torch.float32)])
def test_comfyui_weight_functions_never_touch_a_stored_gguf_float_weight(kind, stored, dtype):
    """A GGUF F32/BF16 weight read in its own dtype is the stored tensor itself: it is copied for ComfyUI's
    in-place patches too, so every call sees the stored weight + 1, not + 1 per call."""
    w, x = torch.randn(8, 16).to(stored), torch.randn(2, 16).to(dtype)
    layer = linear_layer(Packed(w.clone(), kind, (8, 16), None), dtype=dtype)
    layer.weight_function = [lambda weight: weight.add_(1.0)]
    want = torch.nn.functional.linear(x, (w + 1.0).to(dtype), layer.bias.to(dtype))
    assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    assert torch.equal(layer.weight, w)


def test_plain_layer_runs_exactly_as_torch():
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    layer = linear_layer(w)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, layer.bias))
    assert layer.weight_kind == "plain" and describe(torch.nn.Sequential(layer)) == {"plain": 1}


# ---- files converted from the tiny release -------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    files = {}
    for spec, name in ((glm_ar.SPEC, "ar"), (glm_image_dit.SPEC, "dit"), (t5_encoder.SPEC, "glyph")):
        for fmt in ("q8_0", "q4_k", "fp8_e4m3fn", "bf16"):
            path = str(out / f"{name}_{fmt}{conversion.extension(fmt)}")
            # per-channel FP8: what the loaders' fp8_e4m3fn choice makes at load (compared below)
            conversion.convert_component(spec, release, fmt, path, fp8_scale="channel")
            files[name, fmt] = path
    return files


def test_gguf_files_are_read_by_the_gguf_package(converted):
    reader = gguf.GGUFReader(converted["dit", "q4_k"])
    assert reader.fields["general.architecture"].contents() == "glm_image_dit"
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["transformer_blocks.0.attn1.to_q.weight"] == "Q5_0"            # 64-wide rows: K-quant falls back
    assert kinds["transformer_blocks.0.norm1.linear.weight"] == "Q8_0"          # modulation
    assert kinds["proj_out.weight"] == "F32" and kinds["proj_out.bias"] == "F32"   # kept (the source is fp32)
    assert kinds["prior_token_embedding.weight"] == "Q8_0"                      # embedding
    ar = {t.name: t.tensor_type.name for t in gguf.GGUFReader(converted["ar", "q4_k"]).tensors}
    assert ar["lm_head.weight"] == "F32" and ar["model.language_model.embed_tokens.weight"] == "Q8_0"
    assert not any(k.startswith("model.visual") for k in ar)   # only what the AR loader reads


@pytest.mark.parametrize("fmt,cosine", [("bf16", 0.99995), ("q8_0", 0.9995), ("fp8_e4m3fn", 0.995), ("q4_k", 0.98)])
def test_converted_ar_logits_close_to_the_original(release, converted, fmt, cosine):
    """Against the fp32 release (measured: bf16 0.99999, Q8_0 0.99987, FP8 0.9978, Q4_K 0.988; the memory benchmark
    records them for every format). FP8 keeps 3 mantissa bits (~2.5 % weight error), and this random 2-layer model
    magnifies weight error about 10x."""
    ref = load_ar_model(release, "fp32", "cpu")
    model = load_ar_model(converted["ar", fmt], "fp32", "cpu")
    ids = torch.randint(0, 16512, (1, 16), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(16).view(1, 1, 16).expand(3, 1, 16)
    with torch.no_grad():
        want, got = ref(ids, pos, ref.new_cache(1, 16), 0), model(ids, pos, model.new_cache(1, 16), 0)
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) >= cosine
    assert model.layers[0].mlp.gate_up_proj.weight_kind == {"bf16": "plain", "q8_0": "Q8_0", "fp8_e4m3fn": "fp8",
                                                             "q4_k": "Q5_0"}[fmt]


def test_fp8_at_load_equals_the_converted_file(release, converted, caplog):
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        quantized = load_decoder(release, "fp8_e4m3fn", "cpu")
        from_file = load_decoder(converted["dit", "fp8_e4m3fn"], "fp8_e4m3fn", "cpu")
    assert describe(quantized) == describe(from_file)
    for (k, a), b in zip(quantized.state_dict().items(), from_file.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), k
    if not fp8.has_fp8_matmul(torch.device("cpu")):
        said = [r for r in caplog.records if "no FP8 matrix math" in r.getMessage()]
        assert len(said) <= 1  # once per device and process (an earlier test may have said it already)


def test_embedding_rows_dequantize_like_the_whole_table(converted):
    model = load_ar_model(converted["ar", "q4_k"], "fp32", "cpu")
    table = model.embed_tokens
    ids = torch.tensor([[0, 5, 16511, 5]])
    full = ggml.dequantize(table.weight, ggml.QTYPES[table.weight_kind], table.weight_shape)
    assert table.weight_kind == "Q8_0" and torch.equal(table(ids), full[ids])


def test_converted_config_is_embedded(release, converted, tmp_path):
    import shutil
    alone = tmp_path / "glyph_q8_0.gguf"
    shutil.copy(converted["glyph", "q8_0"], alone)  # no config.json anywhere near
    encoder = load_glyph_encoder(str(alone), "fp32", "cpu")
    assert encoder.config == load_glyph_encoder(release, "fp32", "cpu").config


# ---- bad input ---------------------------------------------------------------------------------------------
def test_a_file_of_another_component_is_named(converted):
    with pytest.raises(CheckpointError, match=r"holds a 'glm_image_dit' model \(GGUF .*not 'glm_image_ar'"):
        load_ar_model(converted["dit", "q8_0"], "auto", "cpu")
    with pytest.raises(CheckpointError, match=r"holds a 'glm_image_ar' model \(FP8"):
        load_decoder(converted["ar", "fp8_e4m3fn"], "auto", "cpu")


def test_a_shape_that_differs_is_named(converted, release, tmp_path):
    import json
    import shutil
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(converted["dit", "q8_0"], folder / "dit.gguf")
    config = json.load(open(os.path.join(release, "transformer", "config.json")))
    (folder / "config.json").write_text(json.dumps({**config, "text_embed_dim": 48}))
    with pytest.raises(CheckpointError, match=r"tensor glyph_projector.net.0.proj.weight has shape \(64, 32\) but "
                                              r"the config expects \(64, 48\)"):
        load_decoder(str(folder), "auto", "cpu")


def test_unsupported_gguf_type_names_it_and_the_supported_ones(tmp_path):
    path = str(tmp_path / "iq2.gguf")
    writer = gguf.GGUFWriter(path, "glm_image_dit")
    q3 = gguf.GGMLQuantizationType.IQ2_XXS
    writer.add_tensor("proj_out.weight", np.zeros((4, gguf.GGML_QUANT_SIZES[q3][1]), dtype=np.uint8), raw_dtype=q3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"proj_out.weight is stored as IQ2_XXS.*Supported GGUF types: F32, F16, "
                                              r"BF16, Q8_0.*Q4_K"):
        load_decoder(path, "auto", "cpu")
    # what the file holds, and how to make one the pack reads (from the original: this file cannot be converted)
    with pytest.raises(CheckpointError, match=r"holds IQ2_XXS; architecture tag 'glm_image_dit'.*convert.py "
                                              r"ORIGINAL.safetensors --format q4_k --out iq2_q4_k.gguf"):
        load_decoder(path, "auto", "cpu")


def test_truncated_files_are_named(converted, tmp_path):
    for key, name in ((("dit", "q4_k"), "cut.gguf"), (("dit", "fp8_e4m3fn"), "cut.safetensors")):
        data = open(converted[key], "rb").read()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CheckpointError, match=rf"{name}.*(incomplete or corrupt|download it again)"):
            load_decoder(str(cut), "auto", "cpu").state_dict()


def test_fp8_choice_on_a_gguf_file_says_why(converted):
    with pytest.raises(CheckpointError, match="already quantized .*Choose auto, bf16 or fp32"):
        load_decoder(converted["dit", "q8_0"], "fp8_e4m3fn", "cpu")


def test_loader_dtype_choices_are_those_it_can_run():
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
    choices = {name: NODES[name].INPUT_TYPES()["required"]["dtype"][0] for name in NODES if name.endswith("Loader")
               and "dtype" in NODES[name].INPUT_TYPES()["required"]}
    assert choices["GLMImageARLoader"] == ["auto", "bf16", "fp32", "fp8_e4m3fn"]
    assert choices["GLMImageDecoderLoader"] == choices["GLMImageCogView4DecoderLoader"] == \
        choices["GLMImageGlyphEncoderLoader"] == ["auto", "bf16", "fp32", "fp8_e4m3fn"]
    assert choices["GLMImageVAELoader"] == ["auto", "bf16", "fp32"]
    assert choices["GLMImageTokenizerLoader"] == ["auto", "bf16", "fp32", "fp16"]
    assert choices["GLMImageCogView4TextEncoderLoader"] == ["auto", "bf16", "fp32", "fp16", "fp8_e4m3fn"]
    assert "block_swap" in NODES["GLMImageARLoader"].INPUT_TYPES()["optional"]
    assert "block_swap" not in NODES["GLMImageGlyphEncoderLoader"].INPUT_TYPES().get("optional", {})


def test_block_swap_beyond_the_model_says_why(release):
    from glm_image_nodes.nodes.loaders.glm_image import GLMImageDecoderLoader
    with pytest.raises(ValueError, match="block swap: 5 blocks requested but GlmImageDiT has 2; choose at most 2"):
        GLMImageDecoderLoader().load(release, "fp32", block_swap=5)
    (handle,) = GLMImageDecoderLoader().load(release, "fp32", block_swap=2)
    assert handle.block_swap == 2 and handle.blocks == "transformer_blocks"


def test_checkpoint_view_of_the_formats(release, converted):
    plain = open_checkpoint(os.path.join(release, "transformer"))
    assert plain.kind == "safetensors" and plain.architecture is None
    fp8_file = open_checkpoint(converted["dit", "fp8_e4m3fn"])
    assert fp8_file.kind == "fp8" and "scaled_fp8" not in fp8_file.shapes
    assert not any(k.endswith(".scale_weight") for k in fp8_file.shapes)
    assert set(fp8_file.shapes) == set(plain.shapes)
    assert open_checkpoint(converted["dit", "q4_k"]).format_name == "GGUF Q4_K/Q5_0/Q8_0"
