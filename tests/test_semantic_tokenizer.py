"""GLM-Image semantic tokenizer (vision encoder + cosine VQ) and reference sizing against transformers 5.23.

The reference is ``GlmImageForConditionalGeneration.get_image_features`` + ``get_image_tokens`` on the
output of the PIL backend of ``GlmImageImageProcessor`` (the backend transformers uses without torchvision),
configured from the release's ``processor/preprocessor_config.json``.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from glm_image_nodes.core.formats import reading
from glm_image_nodes.core.formats.reading import CheckpointError, meta_device
from glm_image_nodes.core.models.semantic_tokenizer import (
    SemanticTokenizer,
    SemanticTokenizerConfig,
    load_semantic_tokenizer,
    preprocess_image,
    tokenize_image,
    tokenize_images,
)
from glm_image_nodes.core.runtime.geometry import normalize_reference_size, smart_resize
from glm_image_nodes.core.runtime.images import resize_reference, to_rgb01, to_uint8
from glm_image_nodes.testing.tiny_release import semantic_tokenizer_from_configs, state_dict_for_release
from PIL import Image
from safetensors.torch import save_file

# copies of the release configs (../shared/reference/glm_image) kept in the repo
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs", "full")
FEATURE_TOL = 1e-5   # max abs error of the vision features (fp32)


def tiny_reference(heads=2, hidden=32):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vision_vocab_size=80, pad_token_id=0,
                         eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
        # a 32x32 position table: the test grids (16..64) sample it both finer and coarser
        vision_config=dict(depth=2, hidden_size=hidden, num_heads=heads, intermediate_size=64, image_size=512,
                           patch_size=16),
        vq_config=dict(embed_dim=16, num_embeddings=64, latent_channels=hidden),
        image_token_id=299, image_start_token_id=70, image_end_token_id=71,
    )
    torch.manual_seed(0)
    return GlmImageForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release root: model_index.json, processor/ (the real preprocessor config) and a sharded
    vision_language_encoder/ whose language-model weights sit in shards of their own."""
    root = tmp_path_factory.mktemp("glm_image")
    model = tiny_reference()
    model.save_pretrained(root / "vision_language_encoder", max_shard_size="20KB")
    shutil.copytree(os.path.join(REFERENCE, "processor"), root / "processor")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    return root, model


@pytest.fixture(scope="module")
def processor(release):
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    return GlmImageImageProcessorPil.from_pretrained(str(release[0] / "processor"))


def reference_ids(model, processor, image01):
    inputs = processor(images=[Image.fromarray(to_uint8(image01))], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        ids = model.get_image_tokens(features, inputs["image_grid_thw"])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    return inputs["pixel_values"], features[0], ids.view(h, w)


def patchify(pixels, patch=16):
    _, c, h, w = pixels.shape
    return pixels.view(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4).reshape(-1, c * patch * patch)


@pytest.mark.parametrize("size, grid", [
    ((512, 512), (16, 16)),      # square, used as is (halved)
    ((512, 768), (16, 24)),      # non-square
    ((300, 200), (24, 16)),      # smart_resize scales up (short side < 512)
    ((2304, 1024), (64, 28)),    # smart_resize scales down (long side > 2048)
])
def test_ids_identical_to_transformers(release, processor, size, grid):
    root, model = release
    tokenizer = load_semantic_tokenizer(str(root), dtype="fp32", device="cpu")
    image = torch.rand(*size, 3)
    ref_pixels, ref_features, ref_ids = reference_ids(model, processor, image)

    pixels = preprocess_image(image)
    assert torch.equal(patchify(pixels), ref_pixels)                    # resize, normalization, patch order
    features = tokenizer.features(pixels)[0]
    assert (features - ref_features).abs().max().item() <= FEATURE_TOL
    ids = tokenize_image(tokenizer, image)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == grid
    assert torch.equal(ids, ref_ids)


def test_target_size_and_batch(release, processor):
    root, model = release
    tokenizer = load_semantic_tokenizer(str(root / "vision_language_encoder"), dtype="fp32", device="cpu")
    images = torch.rand(2, 300, 420, 3)
    ids = tokenize_images(tokenizer, images, 512, 704)
    assert [tuple(i.shape) for i in ids] == [(16, 22)] * 2
    for image, got in zip(images, ids):
        # same as handing the reference processor the reference pre-resized to the target (PIL Lanczos)
        assert torch.equal(got, reference_ids(model, processor, resize_reference(image, 512, 704))[2])
    with pytest.raises(ValueError, match="multiples of 32"):
        tokenize_image(tokenizer, images[0], 500, 704)
    # below the processor's 512 px minimum side the grid still follows the target (its minimum is lowered)
    assert tuple(tokenize_image(tokenizer, images[0], 256, 320).shape) == (8, 10)
    with pytest.raises(ValueError, match="at most 2048 px"):
        tokenize_image(tokenizer, images[0], 4096, 1024)
    with pytest.raises(ValueError, match="aspect ratio must be at most 4"):
        tokenize_image(tokenizer, images[0], 2048, 256)


def test_loader_reads_only_vision_and_vq(release, monkeypatch):
    root, model = release
    folder = root / "vision_language_encoder"
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    lm_only = {s for s in set(weight_map.values())
               if all(not k.startswith(("model.visual.", "model.vqmodel.")) for k, v in weight_map.items() if v == s)}
    assert lm_only, "the fixture must put language-model weights in shards of their own"

    opened, read = [], []
    real_safe_open = reading.safe_open

    class Spy:
        def __init__(self, path, **kwargs):
            opened.append(os.path.basename(path))
            self._cm = real_safe_open(path, **kwargs)

        def __enter__(self):
            self._file = self._cm.__enter__()
            return self

        def __exit__(self, *exc):
            return self._cm.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_slice(self, key):  # header only
            return self._file.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self._file.get_tensor(key)

    monkeypatch.setattr(reading, "safe_open", Spy)
    tokenizer = load_semantic_tokenizer(str(root), dtype="fp32", device="cpu")

    assert read and all(k.startswith(("model.visual.", "model.vqmodel.")) for k in read)
    assert not any("post_quant_conv" in k for k in read)
    assert not lm_only & set(opened)
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(("model.visual.", "model.vqmodel.")) and "post_quant_conv" not in n)
    assert sum(p.numel() for p in tokenizer.parameters()) == expected
    assert tokenizer.config.min_pixels == 262144 and tokenizer.config.max_pixels == 4194304


def test_single_file_infers_config(tmp_path, processor):
    model = tiny_reference(heads=16, hidden=48)   # shapes cannot show the head count: 16 is the release value
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("model.visual.", "model.vqmodel."))}
    save_file(sd, str(tmp_path / "glm_image_vision_vq.safetensors"))
    tokenizer = load_semantic_tokenizer(str(tmp_path / "glm_image_vision_vq.safetensors"), dtype="fp32", device="cpu")
    cfg = tokenizer.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.image_size, cfg.embed_dim,
            cfg.num_embeddings) == (2, 48, 16, 64, 512, 16, 64)
    image = torch.rand(512, 640, 3)
    assert torch.equal(tokenize_image(tokenizer, image), reference_ids(model, processor, image)[2])


def test_release_config_matches_documented_shapes():
    release_config = reading.read_config(f"{REFERENCE}/vision_language_encoder")
    cfg = SemanticTokenizerConfig.from_release_config(release_config, "ref")
    assert cfg == SemanticTokenizerConfig()
    with meta_device():
        tokenizer = SemanticTokenizer(cfg)
    shapes = {k: tuple(v.shape) for k, v in tokenizer.state_dict().items()}
    assert shapes["model.visual.embeddings.position_embedding.weight"] == (16384, 1536)
    assert shapes["model.visual.blocks.39.attn.qkv.weight"] == (4608, 1536)
    assert shapes["model.vqmodel.quant_conv.weight"] == (2048, 1536, 1, 1)
    assert shapes["model.vqmodel.quantize.embedding.weight"] == (16384, 2048)
    assert 1.1e9 < sum(math.prod(s) for s in shapes.values()) < 1.3e9


def test_release_state_dict_has_the_reference_keys(release):
    _, model = release
    tokenizer = semantic_tokenizer_from_configs(model.config.vision_config.to_dict(), model.config.vq_config.to_dict())
    ours = {k: tuple(v.shape) for k, v in state_dict_for_release(tokenizer.state_dict()).items()}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()
                    if k.startswith(("model.visual.", "model.vqmodel."))}


def test_cosine_vq_ignores_feature_scale():
    cfg = SemanticTokenizerConfig(depth=1, hidden_size=8, num_heads=2, intermediate_size=16, image_size=64,
                                  embed_dim=6, num_embeddings=50)
    tokenizer = SemanticTokenizer(cfg)
    codebook = torch.randn(50, 6) * torch.logspace(-2, 2, 50)[:, None]     # rows of very different norms
    tokenizer.model["vqmodel"].quantize.embedding.weight.data.copy_(codebook)
    z = torch.randn(200, 6)
    ids = tokenizer.model["vqmodel"].quantize(z)
    cosine = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(codebook, dim=1).t()
    assert torch.equal(ids, cosine.argmax(1))
    scales = torch.logspace(-3, 3, 200)[torch.randperm(200)][:, None]
    assert torch.equal(tokenizer.model["vqmodel"].quantize(z * scales), ids)
    assert not torch.equal(torch.cdist(z, codebook).argmin(1), ids)        # plain L2 would pick other codes


def test_missing_vision_weights_named(tmp_path, release):
    _, model = release
    sd = model.state_dict()
    for name, prefixes in [("lm_only", ("model.language_model.", "lm_head.")),
                           ("no_visual", ("model.language_model.", "lm_head.", "model.vqmodel."))]:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(release[0] / "vision_language_encoder" / "config.json", folder / "config.json")
        kept = {k: v.contiguous() for k, v in sd.items() if k.startswith(prefixes)}
        save_file(kept, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError) as err:
            load_semantic_tokenizer(str(folder), dtype="fp32", device="cpu")
        message = str(err.value)
        assert "no model.visual.* " in message and "vision_language_encoder" in message
        assert ("model.vqmodel.*" in message.split("keys:")[0]) == (name == "lm_only")
        if name == "lm_only":
            assert "only the language model" in message


def test_reference_size_invariant_over_many_sizes():
    sides = list(range(32, 4200, 53)) + [512, 1024, 2048, 2049, 511]
    checked = 0
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 4:
                continue
            nh, nw, note = normalize_reference_size(h, w)
            assert nh % 32 == 0 and nw % 32 == 0 and 512 <= min(nh, nw) and max(nh, nw) <= 2048
            assert max(nh, nw) / min(nh, nw) <= 4
            ar = smart_resize(nh, nw)
            assert (2 * ar[0] // 16, 2 * ar[1] // 16) == (nh // 16, nw // 16)
            assert abs(nh / nw - h / w) <= (h / w) * 0.1 + 0.07        # aspect kept up to 32-px rounding
            assert (note == "") == ((nh, nw) == (h, w))
            checked += 1
    assert checked > 2000
    assert normalize_reference_size(1024, 768) == (1024, 768, "")
    h, w, note = normalize_reference_size(3000, 1000)
    assert (h, w) == (2048, 672) and "3000x1000" in note and "2048x672" in note


def test_smart_resize_is_the_processors():
    from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize as reference

    for h in range(16, 5000, 97):
        for w in range(16, 5000, 89):
            if max(h, w) / min(h, w) <= 4:
                assert smart_resize(h, w, 16, 262144, 4194304) == reference(h, w, 16, 262144, 4194304)


def test_reference_size_errors():
    with pytest.raises(ValueError, match=r"crop to 2000x500 or pad to 3000x750"):
        normalize_reference_size(3000, 500)
    with pytest.raises(ValueError, match=r"crop to 300x1200 or pad to 400x1600"):
        normalize_reference_size(300, 1600)
    with pytest.raises(ValueError, match="too small"):
        normalize_reference_size(20, 600)


def test_pixel_formats_convert(release):
    rgb8 = torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8)
    rgb = rgb8.float() / 255
    gray8 = rgb8[..., 0]
    assert torch.equal(to_rgb01(gray8), (gray8.float() / 255)[..., None].expand(64, 48, 3))
    assert torch.equal(to_rgb01(gray8.numpy()[..., None]), to_rgb01(gray8))
    assert torch.equal(to_rgb01(torch.cat([rgb8, torch.zeros(64, 48, 1, dtype=torch.uint8)], -1)), rgb)    # RGBA
    assert torch.equal(to_rgb01(Image.fromarray(np.concatenate([rgb8.numpy(), rgb8.numpy()[..., :1]], -1))), rgb)
    rgb16 = rgb8.numpy().astype(np.uint16) * 257                                                          # 16-bit
    assert torch.allclose(to_rgb01(rgb16), rgb, atol=1e-6)
    assert torch.allclose(to_rgb01(torch.from_numpy(rgb16.astype(np.int32))), rgb, atol=1e-6)
    assert torch.allclose(to_rgb01(Image.fromarray(np.ascontiguousarray(rgb16[..., 0]))), to_rgb01(gray8), atol=1e-6)
    assert torch.equal(to_rgb01(rgb[None]), rgb)                                                          # [1,H,W,3]
    with pytest.raises(ValueError, match="0..1"):
        to_rgb01(rgb * 255)
    with pytest.raises(ValueError, match="channels-last"):
        to_rgb01(torch.rand(64, 48, 5))

    tokenizer = load_semantic_tokenizer(str(release[0]), dtype="fp32", device="cpu")
    big = torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8)
    ids = tokenize_image(tokenizer, big.float() / 255)
    assert torch.equal(tokenize_image(tokenizer, torch.cat([big, big[..., :1]], -1)), ids)               # RGBA
    assert torch.equal(tokenize_image(tokenizer, big.numpy().astype(np.uint16) * 257), ids)               # 16-bit
    gray = big[..., 0]
    assert torch.equal(tokenize_image(tokenizer, gray), tokenize_image(tokenizer, gray[..., None].expand(512, 512, 3)))
