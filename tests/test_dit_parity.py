"""GLM-Image DiT: forward and reference K/V cache parity with diffusers' GlmImageTransformer2DModel (fp32)."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache  # noqa: E402
from glm_image_nodes.core.formats.reading import CheckpointError  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import load_decoder  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import (
    ShiftSettings,  # noqa: E402
    release_shift_settings,  # noqa: E402
)
from glm_image_nodes.nodes.loaders.glm_image import GLMImageDecoderLoader  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import GLM_TINY, single_thread, tiny_glm_image_dit, write_release  # noqa: E402

TOL = 1e-5  # max abs, fp32


_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = tiny_glm_image_dit()
    root = write_release(str(tmp_path_factory.mktemp("glm")), ref, "GlmImagePipeline")
    return ref, load_decoder(os.path.join(root, "transformer"), dtype="fp32", device="cpu"), root


def inputs(b, h, w, glyph_len=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = (h // 2) * (w // 2)
    return dict(latents=torch.randn(b, 16, h, w, generator=g), glyph=torch.randn(b, glyph_len, 32, generator=g),
                ids=torch.randint(0, 64, (b, n), generator=g), t=torch.tensor([999.0, 420.0, 0.0][:b]),
                size=torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1), crop=torch.tensor([[0.0, 16.0]]).repeat(b, 1))


def run_ref(ref, x, drop, kv=None):
    drop_mask = torch.as_tensor(drop).view(-1, 1).expand_as(x["ids"]).clone()
    return ref(x["latents"], x["glyph"], x["ids"], drop_mask, x["t"], x["size"], x["crop"],
               kv_caches=kv, return_dict=False)[0]


@pytest.mark.parametrize("b,h,w,drop", [(1, 8, 8, False), (1, 8, 8, True), (1, 8, 12, False),
                                        (2, 12, 8, [False, True])])
def test_forward_parity(models, b, h, w, drop):
    ref, dit, _ = models
    x = inputs(b, h, w)
    with torch.no_grad():
        want = run_ref(ref, x, drop)
        got = dit(x["latents"], x["glyph"], x["ids"], torch.tensor(drop) if isinstance(drop, list) else drop,
                  x["t"], x["size"], x["crop"])
    assert got.shape == (b, 16, h, w)
    err = (got - want).abs().max().item()
    assert err <= TOL, err
    assert want.abs().max() > 0.1  # not a degenerate output


def test_prior_drop_matters(models):
    _, dit, _ = models
    x = inputs(1, 8, 8)
    with torch.no_grad():
        a = dit(x["latents"], x["glyph"], x["ids"], False, x["t"], x["size"], x["crop"])
        b = dit(x["latents"], x["glyph"], x["ids"], True, x["t"], x["size"], x["crop"])
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("ref_sizes", [[(8, 8)], [(8, 8), (4, 12)]])
def test_reference_kv_cache_parity(models, ref_sizes):
    ref, dit, _ = models
    refs = [inputs(1, h, w, seed=10 + i) for i, (h, w) in enumerate(ref_sizes)]
    target = inputs(1, 8, 12, seed=3)
    kv = GlmImageKVCache(ref.config.num_layers)
    cache = dit.new_kv_cache()
    with torch.no_grad():
        kv.set_mode("write")
        for r in refs:
            empty = r["glyph"][:, :0]
            ref(r["latents"], empty, r["ids"][0], torch.zeros_like(r["ids"][0], dtype=torch.bool), torch.zeros(1),
                r["size"], torch.zeros(1, 2), kv_caches=kv)
            dit(r["latents"], empty, r["ids"][0], False, torch.zeros(1), r["size"], torch.zeros(1, 2),
                kv_cache=cache, kv_mode="write")
        assert cache.num_tokens == sum((h // 2) * (w // 2) for h, w in ref_sizes)
        kv.set_mode("read")
        want = run_ref(ref, target, False, kv)
        got = dit(target["latents"], target["glyph"], target["ids"], False, target["t"], target["size"],
                  target["crop"], kv_cache=cache, kv_mode="read")
        kv.set_mode("skip")
        want_skip = run_ref(ref, target, True, kv)
        got_skip = dit(target["latents"], target["glyph"], target["ids"], True, target["t"], target["size"],
                       target["crop"], kv_cache=cache, kv_mode="skip")
        plain = dit(target["latents"], target["glyph"], target["ids"], False, target["t"], target["size"],
                    target["crop"])
    assert (got - want).abs().max().item() <= TOL
    assert (got_skip - want_skip).abs().max().item() <= TOL
    assert (got - plain).abs().max() > 1e-3  # the cache is actually read


def test_batch_reads_shared_cache(models):
    _, dit, _ = models
    r = inputs(1, 8, 8, seed=7)
    target = inputs(2, 8, 8, seed=8)
    cache = dit.new_kv_cache()
    with torch.no_grad():
        dit(r["latents"], r["glyph"][:, :0], r["ids"], False, torch.zeros(1), r["size"], torch.zeros(1, 2),
            kv_cache=cache, kv_mode="write")
        both = dit(target["latents"], target["glyph"], target["ids"], False, target["t"], target["size"],
                   target["crop"], kv_cache=cache, kv_mode="read")
        second = dit(target["latents"][1:], target["glyph"][1:], target["ids"][1:], False, target["t"][1:],
                     target["size"][1:], target["crop"][1:], kv_cache=cache, kv_mode="read")
    assert (both[1:] - second).abs().max().item() <= TOL


def test_load_release_root_reads_scheduler(models, tmp_path):
    _, dit, root = models
    config = json.load(open(os.path.join(root, "scheduler", "scheduler_config.json")))
    wanted = ShiftSettings(base_shift=config["base_shift"], max_shift=config["max_shift"])
    assert release_shift_settings(root) == release_shift_settings(os.path.join(root, "transformer")) == wanted
    (handle,) = GLMImageDecoderLoader().load(root, "fp32")
    assert handle.shift_settings == wanted and handle.model.config == dit.config
    from_root = load_decoder(root, dtype="fp32", device="cpu")
    assert from_root.num_layers == GLM_TINY["num_layers"]
    for k, v in dit.state_dict().items():
        assert torch.equal(v, from_root.state_dict()[k])


def test_single_file_infers_config(tmp_path):
    # head_dim is not visible in shapes; the loader keeps the real 128
    ref = tiny_glm_image_dit(num_layers=3, attention_head_dim=128, num_attention_heads=1)
    path = str(tmp_path / "glm_dit.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    dit = load_decoder(path, dtype="fp32", device="cpu")
    assert dit.num_layers == 3 and dit.config.text_embed_dim == 32 and dit.codebook_size == 64
    x = inputs(1, 8, 8)
    with torch.no_grad():
        err = (dit(x["latents"], x["glyph"], x["ids"], False, x["t"], x["size"], x["crop"]) -
               run_ref(ref, x, False)).abs().max().item()
    assert err <= TOL


def test_bf16_close(models):
    ref, _, root = models
    dit = load_decoder(root, dtype="bf16", device="cpu")
    assert dit.dtype == torch.bfloat16
    x = inputs(1, 8, 8)
    with torch.no_grad():
        got = dit(x["latents"], x["glyph"], x["ids"], False, x["t"], x["size"], x["crop"]).float()
        want = run_ref(ref, x, False)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_loader_errors(models, tmp_path):
    _, _, root = models
    with pytest.raises(CheckpointError, match="fp16"):
        load_decoder(root, dtype="fp16", device="cpu")
    bad = tmp_path / "transformer"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "CogView4Transformer2DModel"}))
    with pytest.raises(CheckpointError, match="CogView4Transformer2DModel"):
        load_decoder(str(bad), dtype="fp32", device="cpu")
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="not a GLM-Image DiT"):
        load_decoder(wrong, dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="kv_mode"):
        x = inputs(1, 8, 8)
        load_decoder(root, dtype="fp32", device="cpu")(x["latents"], x["glyph"], x["ids"], False, x["t"],
                                                       x["size"], x["crop"], kv_mode="append")
