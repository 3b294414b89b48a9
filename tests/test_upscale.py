"""2x upscale by GLM-Image re-decoding and the refine pass (GLM-Image, CogView4), on tiny random models.

Random weights prove the plumbing (sizes, what reaches the decoder, the refine start) and nothing about quality;
the fidelity test prints PSNR figures whose only meaningful ones are the bicubic baseline and the strength -> 0
limit (the VAE round trip of the upsample).
"""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from glm_image_nodes.core.models.cogview4_dit import load_cogview4_decoder
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.core.models.semantic_tokenizer import load_semantic_tokenizer, tokenize_image
from glm_image_nodes.core.models.t5_encoder import load_glyph_encoder
from glm_image_nodes.core.models.vae import load_vae
from glm_image_nodes.core.runtime.geometry import normalize_reference_size
from glm_image_nodes.core.stages import upscale
from glm_image_nodes.core.stages.decoder_sampling import sample_cogview4_latents
from glm_image_nodes.core.stages.flow_schedule import cogview4_schedule, glm_image_schedule
from glm_image_nodes.core.stages.glyph import glyph_conditioning
from glm_image_nodes.core.stages.settings import DecoderRun
from glm_image_nodes.core.stages.upscale import refine_cogview4, upsample, upscale_2x
from glm_image_nodes.testing.images import downscale_to, psnr
from glm_image_nodes.testing.tiny_release import write_tiny_release

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import SCHEDULER, tiny_cogview4_dit, write_release  # noqa: E402


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    root = write_tiny_release(str(tmp_path_factory.mktemp("glm_image")))
    return SimpleNamespace(decoder=load_decoder(root, "fp32", "cpu"), vae=load_vae(root, "fp32", "cpu"),
                           tokenizer=load_semantic_tokenizer(root, "fp32", "cpu"),
                           glyph=glyph_conditioning(load_glyph_encoder(root, "fp32", "cpu"), ""))


@pytest.fixture(scope="module")
def cogview4(tmp_path_factory):
    pytest.importorskip("diffusers")
    ref = tiny_cogview4_dit(seed=2)
    root = write_release(str(tmp_path_factory.mktemp("cogview4")), ref, "CogView4Pipeline")
    return ref, load_cogview4_decoder(root, dtype="fp32", device="cpu")


def smoothstep(edge, width, v):
    return ((v - edge) / width + 0.5).clamp(0, 1)


def landscape(size: int = 256, detail: bool = True, seed: int = 0) -> torch.Tensor:
    """Sky gradient, sun disc, textured hills; with ``detail`` a facade with windows and a sign of text-like strokes."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    img = torch.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.95 - 0.15 * y], -1)
    sun = 1 - smoothstep(0.07, 0.02, ((x - 0.75) ** 2 + (y - 0.22) ** 2).sqrt())
    img = img * (1 - sun[..., None]) + torch.tensor([1.0, 0.9, 0.5]) * sun[..., None]
    texture = F.interpolate(torch.rand(1, 1, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic",
                            align_corners=False)[0, 0]
    ridge = 0.62 + 0.06 * torch.sin(2 * torch.pi * 1.3 * x) + 0.03 * torch.sin(2 * torch.pi * 4.1 * x + 1)
    hill = smoothstep(ridge, 0.01, y)[..., None]
    green = torch.stack([0.2 + 0.15 * texture, 0.45 + 0.2 * texture, 0.15 + 0.1 * texture], -1)
    img = img * (1 - hill) + green * hill
    if detail:
        px, py = (x * size).long(), (y * size).long()
        facade = (x > 0.08) & (x < 0.4) & (y > 0.3) & (y < 0.85)
        img[facade] = torch.tensor([0.7, 0.62, 0.55])
        img[facade & (px % 12 >= 4) & (px % 12 < 10) & (py % 16 >= 5) & (py % 16 < 13)] = torch.tensor([0.15, 0.2, 0.3])
        sign = (x > 0.5) & (x < 0.92) & (y > 0.86) & (y < 0.96)
        img[sign] = torch.tensor([0.95, 0.95, 0.9])
        dashes = torch.rand(size // 6 + 1, generator=g) > 0.35
        strokes = sign & (y > 0.87) & (y < 0.95) & (py % 6 < 3) & dashes[px // 6] & (px % 6 < 5)
        img[strokes] = torch.tensor([0.1, 0.1, 0.1])
    return img.clamp(0, 1)


def spy(monkeypatch, name):
    """Record the calls of ``upscale.<name>`` and pass them through."""
    calls, real = [], getattr(upscale, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(upscale, name, wrapper)
    return calls


@pytest.mark.parametrize("height,width", [(256, 256), (256, 192)])
def test_output_size_and_decoder_inputs(glm, monkeypatch, height, width):
    image = landscape()[:height, :width]
    samples, refs = spy(monkeypatch, "sample_latents"), spy(monkeypatch, "prepare_references")
    seen = []
    hook = glm.tokenizer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        out = upscale_2x(image, decoder=glm.decoder, vae=glm.vae, tokenizer=glm.tokenizer, glyph=glm.glyph, steps=2)
    finally:
        hook.remove()
    assert out.shape == (2 * height, 2 * width, 3) and torch.isfinite(out).all()

    (dit, prior_ids, glyph, h, w), kwargs = samples[0]
    assert (h, w) == (2 * height, 2 * width) and dit is glm.decoder and glyph is glm.glyph
    # the tokenizer sees the input at its own size (half the output) and the grid is output / 32
    assert seen[0] == (height, width)
    ids = tokenize_image(glm.tokenizer, image, h, w)
    assert ids.shape == (h // 32, w // 32)
    assert torch.equal(prior_ids, ids.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten()[None])
    # the reference is the input, resized by the reference path (sides >= 512)
    assert torch.equal(refs[0][0][0][0], image)
    assert kwargs["references"].sizes == [normalize_reference_size(height, width)[:2]]
    assert "start_latents" not in kwargs and kwargs["settings"].steps == 2


def test_refine_starts_from_noised_upsample(glm, monkeypatch):
    image = landscape(128)
    samples = spy(monkeypatch, "sample_latents")
    forwards = []
    hook = glm.decoder.register_forward_hook(lambda m, args, out: forwards.append(out.shape[0]))
    try:
        out = upscale_2x(image, decoder=glm.decoder, vae=glm.vae, tokenizer=glm.tokenizer, glyph=glm.glyph,
                         steps=10, strength=0.3, use_reference=False)
    finally:
        hook.remove()
    assert out.shape == (256, 256, 3)
    kwargs = samples[0][1]
    assert kwargs["start_sigma"] == 0.3 and kwargs["references"] is None
    assert torch.equal(kwargs["start_latents"], glm.vae.encode(upsample(image, 256, 256)[None]).float())
    remaining = len(glm_image_schedule(10, 256, 256).starting_at(0.3))
    assert 0 < remaining < 10 and len(forwards) == remaining  # one batched CFG forward per remaining step


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"a model was used ({name}) before the input was checked")


def test_errors_before_any_model_runs():
    models = dict(decoder=Untouchable(), vae=Untouchable(), tokenizer=Untouchable(), glyph=None)
    with pytest.raises(ValueError, match=r"2048 px per side.*crops of at most 1024 px.*ImageUpscaleWithModel"):
        upscale_2x(torch.zeros(1040, 800, 3), **models)
    with pytest.raises(ValueError, match="at least 32 px"):
        upscale_2x(torch.zeros(24, 64, 3), **models)
    with pytest.raises(ValueError, match="aspect ratio"):
        upscale_2x(torch.zeros(64, 300, 3), **models)
    with pytest.raises(ValueError, match="strength"):
        upscale_2x(torch.zeros(64, 64, 3), strength=0.0, **models)
    cogview = dict(decoder=Untouchable(), vae=Untouchable(), cond_embeds=None, uncond_embeds=None)
    with pytest.raises(ValueError, match="2048.*ImageUpscaleWithModel"):
        refine_cogview4(torch.zeros(1100, 1100, 3), scale=2.0, **cogview)
    with pytest.raises(ValueError, match="512..2048"):
        refine_cogview4(torch.zeros(200, 200, 3), scale=1.0, **cogview)


def test_cogview4_refine(glm, cogview4, monkeypatch):
    _, dit = cogview4
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 5, 48, generator=g), torch.randn(1, 3, 48, generator=g)
    samples = spy(monkeypatch, "sample_cogview4_latents")
    image = landscape(320)[:256]
    out = refine_cogview4(image, decoder=dit, vae=glm.vae, cond_embeds=cond, uncond_embeds=uncond, scale=2.0,
                          steps=4, strength=0.5)
    assert out.shape == (512, 640, 3) and torch.isfinite(out).all()
    args, kwargs = samples[0]
    assert args[3:] == (512, 640) and kwargs["start_sigma"] == 0.5
    assert torch.equal(kwargs["start_latents"], glm.vae.encode(upsample(image, 512, 640)[None]).float())


def test_cogview4_start_sigma_matches_pipeline(cogview4):
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler
    ref, dit = cogview4
    height, width, steps = 64, 96, 6
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 7, 48, generator=g), torch.randn(1, 4, 48, generator=g)
    start, noise = torch.randn(2, 1, 16, height // 8, width // 8, generator=g)
    run = dict(settings=DecoderRun(steps=steps, guidance=3.5), noise=noise, progress=False)
    full = sample_cogview4_latents(dit, cond, uncond, height, width, **run)
    assert torch.equal(full, sample_cogview4_latents(dit, cond, uncond, height, width, start_latents=start,
                                                     start_sigma=1.0, **run))
    tail = cogview4_schedule(steps, height, width).starting_at(0.7)
    assert 0 < len(tail) < steps
    s = tail.sigmas[0]
    got = sample_cogview4_latents(dit, cond, uncond, height, width, start_latents=start, start_sigma=0.7, **run)
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    raw = tail.model_timesteps.int().tolist()
    with torch.no_grad():
        want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
                    num_inference_steps=len(raw), timesteps=raw, guidance_scale=3.5,
                    latents=(1 - s) * start + s * noise, output_type="latent", return_dict=False)[0]
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err
    assert (got - full).abs().max() > 1e-2
    with pytest.raises(ValueError, match="together"):
        sample_cogview4_latents(dit, cond, uncond, height, width, start_sigma=0.5, **run)


def test_psnr():
    a = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0))
    assert psnr(a, a.clone()) == math.inf
    b = a.clone()
    b[0, 0, 0] += 0.5  # mse = 0.25 / 768
    assert psnr(a, b) == pytest.approx(10 * math.log10(768 / 0.25), abs=1e-5)
    assert psnr(a, (a + 0.1)) == pytest.approx(20.0, abs=1e-4)
    assert torch.allclose(downscale_to(torch.ones(8, 6, 3), 4, 3), torch.ones(4, 3, 3))
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:8])


def test_fidelity_figures(glm):
    """Upscale, downscale back, PSNR against the input. With random weights only the bicubic baseline and the
    strength -> 0 limit mean anything; the model-path figures only show the plumbing produces finite images."""
    image, smooth = landscape(), landscape(detail=False)
    baseline = psnr(downscale_to(upsample(image, 512, 512), 256, 256), image)
    baseline_smooth = psnr(downscale_to(upsample(smooth, 512, 512), 256, 256), smooth)
    run = dict(decoder=glm.decoder, vae=glm.vae, tokenizer=glm.tokenizer, glyph=glm.glyph, steps=10)
    figures = {"bicubic baseline": baseline, "bicubic baseline (smooth image)": baseline_smooth}
    for strength in (1.0, 0.3):
        out = upscale_2x(image, strength=strength, **run)
        assert out.shape == (512, 512, 3) and torch.isfinite(out).all()
        figures[f"model, strength {strength}"] = psnr(downscale_to(out, 256, 256), image)
    # below the last sigma of the schedule no step is left: the refine is the VAE round trip of the upsample
    last_sigma = glm_image_schedule(10, 512, 512).sigmas[-2].item()
    limit = upscale_2x(image, strength=last_sigma / 2, use_reference=False, **run)
    round_trip = glm.vae.decode(glm.vae.encode(upsample(image, 512, 512)[None]))[0]
    assert torch.equal(limit, round_trip)
    figures[f"strength {last_sigma / 2:.3f} (= VAE round trip)"] = psnr(downscale_to(limit, 256, 256), image)
    for name, value in figures.items():
        print(f"PSNR {name}: {value:.2f} dB")
    assert baseline_smooth > 30 and baseline > 30
    assert all(math.isfinite(v) for v in figures.values())


def test_nodes(glm):
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
    node = NODE_CLASS_MAPPINGS["GLMImageUpscale"]
    refine = NODE_CLASS_MAPPINGS["GLMImageCogView4Refine"]
    assert node.CATEGORY == refine.CATEGORY == "GLM-Image/upscale"
    assert set(refine.INPUT_TYPES()["required"]) >= {"decoder", "vae", "conditioning", "image", "scale", "strength"}
    batch = torch.stack([landscape(64, seed=0), landscape(64, seed=1)])
    from glm_image_nodes.core.stages import handles
    (out,) = node().upscale(handles.Decoder(glm.decoder), handles.ModelHandle(glm.vae),
                            handles.ModelHandle(glm.tokenizer), glm.glyph, batch, seed=0, steps=2, guidance=1.5,
                            strength=1.0, use_reference=True)
    assert out.shape == (2, 128, 128, 3) and not torch.equal(out[0], out[1])
