"""GLM-Image text-to-image and editing end to end through the pack's NODES, against diffusers 0.42.1
``GlmImagePipeline`` (fp32, tiny random weights), plus the demo script.

One tiny release is written with the reference classes' own ``save_pretrained`` (transformer, text_encoder +
tokenizer, vae, vision_language_encoder, scheduler, model_index.json); the pack loads it through its loader
nodes. The pipeline runs without its AR model (``processor`` and ``vision_language_encoder`` None): it gets
the target prior ids (``prior_token_ids``, the 2x-upsampled grid) and, when editing, the pack's reference
token ids (``prior_token_image_ids`` + ``source_image_grid_thw``). Both get the same initial noise: the
sampler node draws fp32 ``randn`` on the CPU from the seed, the pipeline receives that tensor as ``latents``.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline  # noqa: E402
from glm_image_nodes.core.stages import decoder_sampling  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import FlowSchedule  # noqa: E402
from glm_image_nodes.core.stages.handles import TokenGrid  # noqa: E402
from glm_image_nodes.nodes.conditioning.glyph import GLMImageGlyphConditioning  # noqa: E402
from glm_image_nodes.nodes.conditioning.references import GLMImageReferenceImages  # noqa: E402
from glm_image_nodes.nodes.loaders.glm_image import (  # noqa: E402
    GLMImageDecoderLoader,
    GLMImageGlyphEncoderLoader,
    GLMImageTokenizerLoader,
    GLMImageVAELoader,
)
from glm_image_nodes.nodes.sampling.decoder import GLMImageDecoderSampler  # noqa: E402
from glm_image_nodes.nodes.sampling.vae import GLMImageVAEDecode, GLMImageVAEEncode  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import ByT5Tokenizer, GlmImageConfig, GlmImageForConditionalGeneration, T5Config, T5EncoderModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import SCHEDULER, randomize, tiny_glm_image_dit  # noqa: E402

# Max abs error on 0..1 pixels (fp32; measured ~1e-7). Conditioning the DiT on the shifted timesteps (the
# diffusers 0.40/0.41 bug) moves the same image by > 100x this (asserted). The tiny random VAE shrinks latent
# differences ~30x into pixels, hence a tolerance tighter than 1e-4.
PIXEL_TOL = 1e-5
PROMPT = "A sign that says \"OPEN\" and 'late'"
# Target: an 8x16 d32 token grid. Not 256x256: there mu = 1 and the shifted sigmas equal the unshifted ones,
# so conditioning on the shifted timesteps would differ by 1 (of 1000) only.
H, W = 256, 512
REF = 512                       # reference side: inside 512..2048 and a multiple of 32, so used as is
SEED, STEPS, GUIDANCE = 7, 3, 1.5
CODEBOOK = 64                   # the tiny DiT's prior codebook and the tiny VQ's
MEAN = [(-1) ** i * 0.1 * i for i in range(16)]
STD = [1.0 + 0.1 * i for i in range(16)]


def tiny_vision_language_encoder() -> GlmImageForConditionalGeneration:
    config = GlmImageConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vision_vocab_size=80, pad_token_id=0,
                         eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, image_size=512, patch_size=16),
        vq_config=dict(embed_dim=16, num_embeddings=CODEBOOK, latent_channels=32),
        image_token_id=299, image_start_token_id=70, image_end_token_id=71)
    torch.manual_seed(1)
    return GlmImageForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release root and a GlmImagePipeline built from the very modules that were saved into it."""
    root = tmp_path_factory.mktemp("glm_image_release")
    transformer = tiny_glm_image_dit(seed=3, prior_vq_quantizer_codebook_size=CODEBOOK)
    text_encoder = randomize(T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=48, d_kv=8, num_heads=4,
                                                     num_layers=1, feed_forward_proj="gated-gelu")), seed=4)
    vae = randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  norm_num_groups=4, mid_block_add_attention=False, use_quant_conv=False,
                                  use_post_quant_conv=False, latents_mean=MEAN, latents_std=STD), seed=5)
    transformer.save_pretrained(root / "transformer")
    text_encoder.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    vae.save_pretrained(root / "vae")
    tiny_vision_language_encoder().save_pretrained(root / "vision_language_encoder")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "GlmImagePipeline", "transformer": ["diffusers", "GlmImageTransformer2DModel"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "ByT5Tokenizer"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"]}))
    pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer.from_pretrained(root / "tokenizer"), processor=None,
                            text_encoder=text_encoder, vision_language_encoder=None, vae=vae,
                            transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return str(root), pipe


@pytest.fixture(scope="module")
def nodes(release):
    """The pack's components, loaded through its loader nodes, and the glyph conditioning of PROMPT."""
    root, _ = release
    decoder, = GLMImageDecoderLoader().load(checkpoint=root, dtype="fp32")
    glyph_encoder, = GLMImageGlyphEncoderLoader().load(checkpoint=root, dtype="fp32")
    vae, = GLMImageVAELoader().load(checkpoint=root, dtype="fp32")
    tokenizer, = GLMImageTokenizerLoader().load(checkpoint=root, dtype="fp32")
    glyph, = GLMImageGlyphConditioning().encode(glyph_encoder, PROMPT)
    assert glyph.texts == ["late", "OPEN"]  # single quotes first, as the pipeline orders them
    return dict(decoder=decoder, vae=vae, tokenizer=tokenizer, glyph=glyph)


def target_tokens(seed=1) -> TokenGrid:
    ids = torch.randint(0, CODEBOOK, (1, H // 32, W // 32), generator=torch.Generator().manual_seed(seed))
    return TokenGrid(ids=ids, height=H, width=W)


def upsampled(d32: torch.Tensor) -> torch.Tensor:
    """The pipeline's own upsampling of a d32 grid: ``[1, (2h)(2w)]``."""
    return GlmImagePipeline._upsample_token_ids(d32, *d32.shape[-2:])


def pack_image(nodes, tokens, references=None) -> torch.Tensor:
    latent, = GLMImageDecoderSampler().sample(nodes["decoder"], tokens, nodes["glyph"], seed=SEED, steps=STEPS,
                                              guidance=GUIDANCE, references=references)
    image, = GLMImageVAEDecode().decode(nodes["vae"], latent, tiling="off")
    return image


def pipeline_image(pipe, tokens, **kwargs) -> torch.Tensor:
    noise = torch.randn([1, 16, H // 8, W // 8], generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.no_grad():
        image = pipe(prompt=PROMPT, prior_token_ids=upsampled(tokens.ids[0]), height=H, width=W,
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise, output_type="pt",
                     return_dict=False, **kwargs)[0]
    return image.permute(0, 2, 3, 1)  # [B, 3, H, W] -> ComfyUI's [B, H, W, 3]


def test_text_to_image_matches_pipeline(release, nodes, monkeypatch):
    _, pipe = release
    tokens = target_tokens()
    want = pipeline_image(pipe, tokens)
    got = pack_image(nodes, tokens)
    assert got.shape == want.shape == (1, H, W, 3) and got.dtype == torch.float32
    assert float(want.std()) > 0.02  # a picture, not a flat gray the tolerance could not tell apart
    err = (got - want).abs().max().item()
    print(f"text-to-image: max abs pixel error {err:.2e}")
    assert err <= PIXEL_TOL, err

    real = decoder_sampling.glm_image_schedule

    def shifted(steps, height, width, settings=None):  # the model conditioned on sigmas * 1000 (diffusers 0.40/0.41)
        s = real(steps, height, width, settings)
        return FlowSchedule(s.sigmas[:-1] * 1000, s.sigmas)

    monkeypatch.setattr(decoder_sampling, "glm_image_schedule", shifted)
    bad = (pack_image(nodes, tokens) - want).abs().max().item()
    print(f"text-to-image with shifted timesteps: max abs pixel error {bad:.2e}")
    assert bad > 100 * PIXEL_TOL, bad


def reference_images(count, seed=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (REF, REF, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("count", [1, 2])
def test_editing_matches_pipeline(release, nodes, count):
    _, pipe = release
    pixels = reference_images(count)
    batches = [torch.from_numpy(p).float()[None] / 255 for p in pixels]
    references, sizes_used = GLMImageReferenceImages().prepare(nodes["vae"], nodes["tokenizer"], *batches)
    assert sizes_used.splitlines() == [f"reference {i + 1}: {REF}x{REF} (HxW)" for i in range(count)]
    assert [tuple(t.shape) for t in references.token_ids] == [(REF // 32, REF // 32)] * count
    assert len(torch.cat(references.token_ids).unique()) > 1
    ref_ids = [upsampled(t)[0] for t in references.token_ids]
    assert all(torch.equal(a, b) for a, b in zip(references.prior_ids, ref_ids))
    grids = torch.tensor([[1, REF // 16, REF // 16]] * count)

    tokens = target_tokens(seed=2)
    want = pipeline_image(pipe, tokens, image=[Image.fromarray(p) for p in pixels],
                          prior_token_image_ids=[torch.cat(ref_ids)], source_image_grid_thw=[grids])
    got = pack_image(nodes, tokens, references)
    err = (got - want).abs().max().item()
    print(f"editing with {count} reference(s): max abs pixel error {err:.2e}")
    assert err <= PIXEL_TOL, err
    assert (got - pack_image(nodes, tokens)).abs().max().item() > 100 * PIXEL_TOL  # the references count


def test_vae_round_trip_and_token_grid_checks(nodes):
    image = torch.rand(2, 64, 96, 3)
    latent, = GLMImageVAEEncode().encode(nodes["vae"], image)
    assert latent["samples"].shape == (2, 16, 8, 12) and latent["samples"].dtype == torch.float32
    decoded, = GLMImageVAEDecode().decode(nodes["vae"], latent, tiling="off")
    assert decoded.shape == image.shape and 0 <= float(decoded.min()) <= float(decoded.max()) <= 1

    sampler = GLMImageDecoderSampler()
    ids = target_tokens().ids
    for bad, what in ((TokenGrid(ids=ids, height=H, width=2 * W), "too few ids"),
                      (TokenGrid(ids=ids.reshape(1, W // 32, H // 32), height=H, width=W), "transposed grid"),
                      (TokenGrid(ids=ids[0], height=H, width=W), "no batch dimension")):
        with pytest.raises(ValueError, match="token grid"):
            sampler.sample(nodes["decoder"], bad, nodes["glyph"], seed=0, steps=1, guidance=1.0)
        print(f"rejected: {what}")


def test_demo_writes_a_png(tmp_path, monkeypatch, capsys):
    import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the demo's per-user cache folder
    out = tmp_path / "out"
    assert demo.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "cache" / "glm_image_nodes" / "tiny_release" / "model_index.json").is_file()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as png:
        assert png.size == (512, 512) and png.mode == "RGB"
    assert "random weights, so the image is noise" in printed
    for stage in ("GLMImageARSampler", "GLMImageGlyphConditioning", "GLMImageDecoderSampler", "GLMImageVAEDecode",
                  "SaveImage", "total"):
        assert any(line.split()[:1] == [stage] and line.rstrip().endswith(" s") for line in printed.splitlines()), \
            (stage, printed)
