"""sample_latents vs diffusers 0.42.1 GlmImagePipeline(output_type="latent") on a tiny random decoder (fp32).

The pipeline gets the prior ids directly (``prior_token_ids``, plus ``prior_token_image_ids`` and
``source_image_grid_thw`` with reference images), so it never runs the AR model: ``processor`` and
``vision_language_encoder`` are None. Its unconditional glyph comes from a tiny random T5 + ByT5Tokenizer,
which gives our ``GlyphConditioning.uncond`` too. References go through a tiny AutoencoderKL inside the
pipeline; the test encodes them the same way for ``ReferenceImages``.
"""
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import load_decoder  # noqa: E402
from glm_image_nodes.core.stages import decoder_sampling  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import sample_latents  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import FlowSchedule  # noqa: E402
from glm_image_nodes.core.stages.handles import GlyphConditioning, ReferenceImages  # noqa: E402
from glm_image_nodes.core.stages.settings import DecoderRun  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import SCHEDULER, randomize, single_thread, tiny_glm_image_dit, write_release  # noqa: E402

# Max abs on latents after 3-4 steps. Conditioning on shifted timesteps (diffusers 0.40/0.41) moves them by
# more than 100x this on the same model (checked in test_tolerance_catches_shifted_timesteps).
TOL = 1e-5
H, W = 64, 96
GRID = (H // 16) * (W // 16)
MEAN = [(-1) ** i * 0.1 * i for i in range(16)]
STD = [1.0 + 0.1 * i for i in range(16)]


_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = tiny_glm_image_dit(seed=3)
    root = write_release(str(tmp_path_factory.mktemp("glm")), ref, "GlmImagePipeline")
    t5 = randomize(T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=1,
                                            feed_forward_proj="gated-gelu")), seed=4)
    vae = randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  norm_num_groups=4, mid_block_add_attention=False, use_quant_conv=False,
                                  use_post_quant_conv=False, latents_mean=MEAN, latents_std=STD), seed=5)
    pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=None, text_encoder=t5,
                            vision_language_encoder=None, vae=vae, transformer=ref,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    dit = load_decoder(root, dtype="fp32", device="cpu")
    with torch.no_grad():
        uncond = pipe._get_glyph_embeds([""])
    return pipe, dit, uncond


def glyph_for(setup, length, batch=1, seed=0):
    _, _, uncond = setup
    cond = torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))
    return cond, GlyphConditioning(cond=cond, uncond=uncond)


def prior(batch, seed=1):
    return torch.randint(0, 64, (batch, GRID), generator=torch.Generator().manual_seed(seed))


def record_timesteps(module, store):
    return module.register_forward_pre_hook(lambda m, args, kwargs: store.append(
        kwargs["timestep"] if "timestep" in kwargs else args[4]), with_kwargs=True)


def run_pipe(pipe, cond, ids, seed, steps, **kw):
    with torch.no_grad():
        return pipe(prompt_embeds=cond, prior_token_ids=ids, height=H, width=W, num_inference_steps=steps,
                    guidance_scale=kw.pop("guidance", 1.5), generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent", return_dict=False, **kw)[0]


@pytest.mark.parametrize("glyph_len,batch,steps", [(7, 1, 4), (1, 1, 3), (5, 2, 3)])
def test_text_to_image_matches_pipeline(setup, glyph_len, batch, steps):
    # glyph_len 1 equals the uncond length: the two CFG branches run as one batched forward
    pipe, dit, _ = setup
    cond, glyph = glyph_for(setup, glyph_len, batch)
    ids = prior(batch)
    fed_ref, fed_ours = [], []
    hooks = [record_timesteps(pipe.transformer, fed_ref), record_timesteps(dit, fed_ours)]
    try:
        want = run_pipe(pipe, cond, ids, seed=11, steps=steps)
        got = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=steps, guidance=1.5, seed=11),
                             progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert got.shape == want.shape == (batch, 16, H // 8, W // 8) and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert err <= TOL, err
    # the same conditioning timesteps, step by step (batched CFG feeds each value twice per forward)
    ref_t = [float(t[0]) for t in fed_ref[::2]]
    ours = sorted({float(v) for t in fed_ours for v in t.reshape(-1)}, reverse=True)
    assert ours == ref_t


def test_guidance_one_is_conditional_only(setup):
    pipe, dit, _ = setup
    cond, glyph = glyph_for(setup, 4)
    ids = prior(1)
    want = run_pipe(pipe, cond, ids, seed=2, steps=3, guidance=1.0)
    got = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=3, guidance=1.0, seed=2), progress=False)
    assert (got - want).abs().max().item() <= TOL


def references(setup, sizes, seed=20):
    """PIL images, their ReferenceImages (encoded like the pipeline does) and the pipeline's prior inputs."""
    pipe, _, _ = setup
    rng = np.random.default_rng(seed)
    images, latents, ids_up, ids_d32 = [], [], [], []
    for h, w in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        with torch.no_grad():
            pixels = pipe.image_processor.preprocess(img, height=h, width=w)
            z = pipe.vae.encode(pixels).latent_dist.mode()
        latents.append((z - torch.tensor(MEAN).view(1, 16, 1, 1)) / torch.tensor(STD).view(1, 16, 1, 1))
        d32 = torch.randint(0, 64, (h // 32, w // 32), generator=torch.Generator().manual_seed(seed + h + w))
        ids_d32.append(d32)
        ids_up.append(d32.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten())
        images.append(img)
    refs = ReferenceImages(latents=latents, prior_ids=ids_up, token_ids=ids_d32, sizes=list(sizes))
    grids = torch.tensor([[1, h // 16, w // 16] for h, w in sizes])
    return images, refs, dict(prior_token_image_ids=[torch.cat(ids_up)], source_image_grid_thw=[grids])


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 96), (32, 64)]])
def test_editing_matches_pipeline(setup, sizes):
    pipe, dit, _ = setup
    cond, glyph = glyph_for(setup, 6)
    ids = prior(1)
    images, refs, prior_kwargs = references(setup, sizes)
    want = run_pipe(pipe, cond, ids, seed=5, steps=3, image=images, **prior_kwargs)
    got = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=3, guidance=1.5, seed=5), references=refs,
                         progress=False)
    err = (got - want).abs().max().item()
    assert err <= TOL, err
    plain = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=3, guidance=1.5, seed=5), progress=False)
    assert (got - plain).abs().max() > 100 * TOL  # references change the result


def test_tolerance_catches_shifted_timesteps(setup, monkeypatch):
    pipe, dit, _ = setup
    cond, glyph = glyph_for(setup, 7)
    ids = prior(1)
    want = run_pipe(pipe, cond, ids, seed=11, steps=4)
    real = decoder_sampling.glm_image_schedule

    def shifted(steps, height, width, settings=None):  # what diffusers 0.40/0.41 feed the model
        s = real(steps, height, width, settings)
        return FlowSchedule(s.sigmas[:-1] * 1000, s.sigmas)

    monkeypatch.setattr(decoder_sampling, "glm_image_schedule", shifted)
    bad = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=4, guidance=1.5, seed=11), progress=False)
    assert (bad - want).abs().max().item() > 100 * TOL


def test_noise_and_seed(setup):
    _, dit, _ = setup
    _, glyph = glyph_for(setup, 3)
    ids = prior(1)
    noise = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator("cpu").manual_seed(9))
    a = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=2, seed=9), progress=False)
    b = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=2, seed=123), noise=noise, progress=False)
    c = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=2, seed=10), progress=False)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


def test_refine_from_start_sigma(setup):
    pipe, dit, _ = setup
    cond, glyph = glyph_for(setup, 5)
    ids = prior(1)
    start = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    # start_sigma >= 1 keeps the whole schedule and pure noise
    full = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=4), noise=noise, progress=False)
    same = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=4), noise=noise, start_latents=start,
                          start_sigma=1.0,
                          progress=False)
    assert torch.equal(full, same)
    # a tail of the schedule == the pipeline given the same tail of raw timesteps and the noised start
    tail = decoder_sampling.glm_image_schedule(6, H, W).starting_at(0.7)
    assert 0 < len(tail) < 6
    s = tail.sigmas[0]
    got = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=6), noise=noise, start_latents=start,
                         start_sigma=0.7,
                         progress=False)
    raw = (tail.model_timesteps + 1).int().tolist()
    want = run_pipe(pipe, cond, ids, seed=0, steps=len(raw), timesteps=raw, latents=(1 - s) * start + s * noise)
    assert (got - want).abs().max().item() <= TOL
    # below the last sigma nothing is left to do
    assert torch.equal(sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=6), noise=noise,
                                      start_latents=start,
                                      start_sigma=0.0, progress=False), start)


def test_input_errors(setup):
    _, dit, _ = setup
    _, glyph = glyph_for(setup, 3)
    with pytest.raises(ValueError, match="prior ids"):
        sample_latents(dit, prior(1)[:, :-2], glyph, H, W, settings=DecoderRun(steps=1), progress=False)
    bad = prior(1)
    bad[0, 0] = 64
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        sample_latents(dit, bad, glyph, H, W, settings=DecoderRun(steps=1), progress=False)
    with pytest.raises(ValueError, match="together"):
        sample_latents(dit, prior(1), glyph, H, W, settings=DecoderRun(steps=1), start_sigma=0.5, progress=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        sample_latents(dit, prior(1), glyph, H + 8, W, settings=DecoderRun(steps=1), progress=False)
