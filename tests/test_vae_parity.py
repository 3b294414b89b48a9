"""The pack's AutoencoderKL against diffusers' on tiny random configs saved in the release layout."""
import json
import logging
import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE

from glm_image_nodes.core.loading import CheckpointError
from glm_image_nodes.core.vae import blend_weights, load_vae, tile_starts

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
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline", "vae": ["diffusers", "AutoencoderKL"]}))
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
    ref.register_to_config(latents_mean=vae.latents_mean.flatten().tolist(), latents_std=vae.latents_std.flatten().tolist())
    with torch.no_grad():
        assert (vae.decode(latents) - reference_decode(ref, latents)).abs().max().item() < TOL
    cogview = load_vae(str(single), dtype="fp32", device="cpu", family="cogview4")
    assert cogview.latents_mean is None and cogview.scaling_factor == 1.0


def smooth_latent(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h).view(h, 1)
    x = torch.linspace(0, 1, w).view(1, w)
    channels = [torch.sin(2 * math.pi * (0.3 + 0.05 * c) * (x + 0.7 * y) + c) + 0.5 * torch.cos(math.pi * (y - x) + c)
                for c in range(16)]
    return torch.stack(channels).unsqueeze(0)


def test_blend_weights_sum_to_one():
    for size, tile, overlap in ((40, 16, 4), (57, 16, 8), (256, 128, 32), (17, 16, 2), (100, 30, 15)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        total = torch.zeros(size * 8)
        for s, w in zip(starts, blend_weights(starts, tile, size, 8)):
            total[s * 8:s * 8 + w.numel()] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6), (size, tile, overlap)


def test_tiled_decode_close_to_untiled(tmp_path):
    save_release(tmp_path, GLM_STYLE)
    vae = load_vae(str(tmp_path), dtype="fp32", device="cpu")
    latents = smooth_latent(40, 56)
    with torch.no_grad():
        full = vae.decode(latents, tiled=False)
        tiled = vae.decode(latents, tiled=True, tile_size=24, overlap=8)
        single_tile = vae.decode(latents, tiled=True, tile_size=64, overlap=8)
    err = (tiled - full).abs()
    print(f"tiled vs untiled: max abs {err.max().item():.2e}, mean abs {err.mean().item():.2e}")
    assert err.max().item() < 2e-2 and err.mean().item() < 2e-3
    assert torch.equal(single_tile, full)
    # seamless: no step at tile borders larger than the image's own pixel-to-pixel variation
    step = (tiled[:, :, 1:] - tiled[:, :, :-1]).abs().amax(dim=(0, 1, 3))
    reference_step = (full[:, :, 1:] - full[:, :, :-1]).abs().amax(dim=(0, 1, 3))
    assert (step - reference_step).max().item() < 1e-2
    vae.AUTO_TILE_LATENT_PIXELS = 24 * 24
    with torch.no_grad():
        assert torch.equal(vae.decode(latents, tile_size=24, overlap=8), tiled)


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
