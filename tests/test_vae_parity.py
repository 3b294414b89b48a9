"""The pack's AutoencoderKL against diffusers' on tiny random configs saved in the release layout."""
import json
import logging
import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.vae import blend_weights, load_vae, tile_layout

MEAN = [0.1 * i - 0.7 for i in range(16)]
STD = [0.5 + 0.1 * i for i in range(16)]
TINY = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
GLM_STYLE = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.18215, latents_mean=MEAN, latents_std=STD)
ATTENTION_STYLE = dict(TINY, mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True,
                       latents_mean=MEAN, latents_std=STD)
COGVIEW4_STYLE = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=1.0, shift_factor=0.0)
TOL = 1e-5


def save_release(root, config: dict, seed: int = 0) -> ReferenceVAE:
    torch.manual_seed(seed)
    ref = ReferenceVAE(**config).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines and biases
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(root / "vae")
    index = {"_class_name": "GlmImagePipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return ref


def reference_encode(ref: ReferenceVAE, images: torch.Tensor) -> torch.Tensor:
    z = ref.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    cfg = ref.config
    if cfg.latents_mean is not None:
        return (z - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)) / torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def reference_decode(ref: ReferenceVAE, latents: torch.Tensor) -> torch.Tensor:
    cfg = ref.config
    if cfg.latents_mean is not None:
        z = latents * torch.tensor(cfg.latents_std).view(1, -1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
    else:
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return (ref.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def check_parity(tmp_path, config: dict, height: int, width: int):
    ref = save_release(tmp_path, config)
    vae = load_vae(str(tmp_path), dtype="fp32", device="cpu")
    images = torch.rand(2, height, width, 3)
    with torch.no_grad():
        want_z = reference_encode(ref, images)
        got_z = vae.encode(images)
        assert got_z.shape == (2, 16, height // 8, width // 8)
        enc_err = (got_z - want_z).abs().max().item()
        latents = torch.randn_like(want_z)
        got = vae.decode(latents, tiled=False)
        want = reference_decode(ref, latents)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (2, height, width, 3)
    dec_err = (got - want).abs().max().item()
    print(f"encode max abs {enc_err:.2e}, decode max abs {dec_err:.2e}")
    assert enc_err < TOL and dec_err < TOL
    return vae


def test_glm_image_style_parity_non_square(tmp_path):
    vae = check_parity(tmp_path, GLM_STYLE, 48, 80)
    assert torch.equal(vae.latents_mean.flatten(), torch.tensor(MEAN))
    assert vae.model.quant_conv is None and vae.model.decoder.mid_block.attentions is None


def test_mid_attention_and_quant_convs_parity(tmp_path):
    vae = check_parity(tmp_path, ATTENTION_STYLE, 64, 40)
    assert vae.model.quant_conv is not None and vae.model.encoder.mid_block.attentions is not None


def test_cogview4_style_parity(tmp_path):
    vae = check_parity(tmp_path, COGVIEW4_STYLE, 32, 32)
    assert vae.latents_mean is None and vae.scaling_factor == 1.0 and vae.shift_factor == 0.0


def test_single_file_without_config(tmp_path, caplog):
    config = dict(GLM_STYLE, block_out_channels=(32, 32, 32, 32), norm_num_groups=32)
    ref = save_release(tmp_path / "release", config)
    single = tmp_path / "vae.safetensors"
    shutil.copy(tmp_path / "release" / "vae" / "diffusion_pytorch_model.safetensors", single)
    with caplog.at_level(logging.INFO, logger="glm_image_nodes"):
        vae = load_vae(str(single), dtype="fp32", device="cpu")
    assert "no config.json" in caplog.text and "GLM-Image" in caplog.text
    assert vae.model.config.block_out_channels == (32, 32, 32, 32) and vae.model.config.layers_per_block == 1
    assert vae.latents_std.flatten()[3].item() == 4.84375  # the real GLM-Image statistics
    latents = torch.randn(1, 16, 4, 6)
    ref.register_to_config(latents_mean=vae.latents_mean.flatten().tolist(),
                           latents_std=vae.latents_std.flatten().tolist())
    with torch.no_grad():
        assert (vae.decode(latents) - reference_decode(ref, latents)).abs().max().item() < TOL
    cogview = load_vae(str(single), dtype="fp32", device="cpu", family="cogview4")
    assert cogview.latents_mean is None and cogview.scaling_factor == 1.0


def periodic_latent(h: int, w: int, period: int) -> torch.Tensor:
    """Smooth and stationary: every tile of a stride that is a multiple of ``period`` sees the same content,
    so per-tile GroupNorm statistics match the whole image's as closely as they can."""
    y = torch.arange(h).view(h, 1).float()
    x = torch.arange(w).view(1, w).float()
    channels = [0.8 * torch.sin(2 * math.pi * (x / period + c / 16))
                + 0.6 * torch.cos(2 * math.pi * (y / period + c / 7)) for c in range(16)]
    return torch.stack(channels).unsqueeze(0)


def test_tile_layout_and_blend_weights():
    """Tiles cover the latent with at least the asked overlap, no pixel lies in three tiles, the ramps of
    neighbours sum to exactly 1, and a tile's share changes by at most 1/overlap per pixel: no seam."""
    for size, tile, overlap in ((40, 16, 4), (57, 16, 5), (256, 128, 32), (17, 16, 2), (100, 30, 10), (29, 16, 4),
                                (200, 128, 32), (33, 16, 0)):
        starts, length = tile_layout(size, tile, overlap)
        assert length <= tile and starts[0] == 0 and starts[-1] + length == size
        assert all(a + length - b >= overlap for a, b in zip(starts, starts[1:]))
        assert all(a + length <= b for a, b in zip(starts, starts[2:]))
        placed = torch.zeros(len(starts), size * 8)
        for i, (s, w) in enumerate(zip(starts, blend_weights(starts, length, 8))):
            placed[i, s * 8:(s + length) * 8] = w
        assert torch.allclose(placed.sum(0), torch.ones(size * 8), atol=1e-6), (size, tile, overlap)
        if overlap:
            assert (placed[:, 1:] - placed[:, :-1]).abs().max() <= 1 / (8 * overlap) + 1e-6, (size, tile, overlap)


def test_tiled_decode_close_to_untiled(tmp_path, monkeypatch):
    """Tiles differ from the whole image only through their own GroupNorm statistics and borders; on a random
    tiny decoder that is a visible but bounded difference (diffusers' own tiling test allows 0.5)."""
    save_release(tmp_path, GLM_STYLE)
    vae = load_vae(str(tmp_path), dtype="fp32", device="cpu")
    latents = periodic_latent(64, 64, 12)
    assert tile_layout(64, 48, 16) == ([0, 24], 40)
    with torch.no_grad():
        full = vae.decode(latents, tiled=False)
        tiled = vae.decode(latents, tiled=True, tile_size=48, overlap=16)
        crop = latents[..., :16, :24]
        single_tile, crop_full = vae.decode(crop, tiled=True, tile_size=48, overlap=16), vae.decode(crop, tiled=False)
    err = (tiled - full).abs()
    print(f"tiled vs untiled: max abs {err.max().item():.3f}, mean abs {err.mean().item():.4f}")
    assert err.max().item() < 0.25 and err.mean().item() < 0.025
    assert torch.equal(single_tile, crop_full)

    calls = []
    monkeypatch.setattr(vae, "_decode_tiled",
                        lambda z, tile, overlap, progress=None: calls.append((tuple(z.shape), tile, overlap))
                        or torch.zeros(1, 3, z.shape[-2] * 8, z.shape[-1] * 8))
    assert vae.fits_untiled(8192, 8192)  # on the CPU the exact decode is always chosen
    # auto: tiles only when the exact decode would not fit (decided per output size)
    monkeypatch.setattr(vae, "fits_untiled", lambda height, width, device=None: height * width <= 384 * 384)
    with torch.no_grad():
        vae.decode(latents[..., :48, :48])
        assert calls == []
        vae.decode(latents[..., :48, :56], tile_size=32, overlap=8)
    assert calls == [((1, 16, 48, 56), 32, 8)]


def test_bad_sizes_and_fp16_refused(tmp_path):
    save_release(tmp_path, COGVIEW4_STYLE)
    vae = load_vae(str(tmp_path / "vae"), dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"multiples of 8; got 64x60 .*64x56 or 64x64"):
        vae.encode(torch.rand(1, 60, 64, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        vae.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        vae.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(CheckpointError, match="fp16.*NaN"):
        load_vae(str(tmp_path), dtype="fp16", device="cpu")
    assert load_vae(str(tmp_path), dtype="bf16", device="cpu").dtype == torch.bfloat16
