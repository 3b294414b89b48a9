"""Live previews on the tiny release: the latent-to-RGB map fitted from the VAE, the frames the decoder and the
AR stage hand to ComfyUI's progress bar, the Token Grid Preview node, and the demo's preview folder."""
import os
import types

import numpy as np
import pytest
import torch
from glm_image_nodes.core.host import progress
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.core.models.vae import load_vae
from glm_image_nodes.core.runtime.geometry import target_grid
from glm_image_nodes.core.stages import latent_preview, token_preview
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.decoder_sampling import sample_latents
from glm_image_nodes.core.stages.handles import ARModel, GlyphConditioning, TokenGrid
from glm_image_nodes.core.stages.settings import ARSampling, DecoderRun
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
from glm_image_nodes.testing.tiny_release import write_tiny_release
from PIL import Image


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("tiny") / "release"))


@pytest.fixture(scope="module")
def vae(release):
    return load_vae(release, dtype="fp32", device="cpu")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No preview folder, no fitted factors, outside ComfyUI."""
    monkeypatch.setattr(progress, "_preview_folder", None)
    monkeypatch.setattr(progress, "_comfy_args", None)
    monkeypatch.setattr(latent_preview, "_release_fits", {})
    monkeypatch.setattr(latent_preview, "_fitted", {})


def r_squared(predicted, actual):
    """Per colour channel: 1 - MSE / MSE of the best constant (the mean colour, whose R^2 is 0)."""
    return 1 - ((predicted - actual) ** 2).sum(0) / ((actual - actual.mean(0)) ** 2).sum(0)


def test_fitted_map_follows_the_real_decode_far_better_than_a_constant(release, vae, tmp_path):
    factors = latent_preview.fit_latent_rgb(vae)
    assert factors.weights.shape == (16, 3) and factors.bias.shape == (3,)
    held_out = latent_preview.fitting_latents(16, count=2, seed=7)       # not the fitting latents (seed 0)
    actual = latent_preview.cell_colours(vae, held_out).permute(0, 2, 3, 1).reshape(-1, 3)
    predicted = torch.stack([factors.rgb(z) for z in held_out]).reshape(-1, 3)
    correlation = torch.stack([torch.corrcoef(torch.stack([predicted[:, c], actual[:, c]]))[0, 1] for c in range(3)])
    # Measured on this tiny random VAE: correlation 0.64/0.60/0.64, R^2 0.41/0.34/0.40 per channel. A constant map
    # (the best one: the mean colour) has R^2 0 and no correlation; the random decoder is far from linear.
    assert correlation.min() > 0.5, correlation
    assert r_squared(predicted, actual).min() > 0.25, r_squared(predicted, actual)
    # the factors belong to this VAE: another tiny VAE's miss this one's colours (R^2 -8.6/-26.6/-12.6)
    other = load_vae(write_tiny_release(str(tmp_path / "other"), seed=1), dtype="fp32", device="cpu")
    foreign = latent_preview.fit_latent_rgb(other)
    foreign_predicted = torch.stack([foreign.rgb(z) for z in held_out]).reshape(-1, 3)
    assert (r_squared(foreign_predicted, actual) < 0).all(), r_squared(foreign_predicted, actual)


def test_factors_are_fitted_once_per_vae_file(release, vae, monkeypatch):
    calls = []
    fit = latent_preview.fit_latent_rgb
    monkeypatch.setattr(latent_preview, "fit_latent_rgb",
                        lambda v, device=None: calls.append(v) or fit(v, device=device))
    first = latent_preview.latent_rgb_for(vae)
    assert latent_preview.latent_rgb_for(vae) is first
    reloaded = load_vae(release, dtype="fp32", device="cpu")                 # the same file, loaded again
    assert latent_preview.latent_rgb_for(reloaded) is first
    assert len(calls) == 1


def test_preview_method_decides_and_the_workflow_or_the_release_supplies_the_colours(release, vae, monkeypatch):
    assert progress.preview_method() == "none"                 # outside ComfyUI, unless a folder is named
    assert latent_preview.decoder_preview("glm_image", vae) is None
    comfy_args = types.SimpleNamespace(preview_method=types.SimpleNamespace(value="auto"), preview_size=256)
    monkeypatch.setattr(progress, "_comfy_args", comfy_args)   # ComfyUI's --preview-method auto
    assert progress.preview_method() == "auto" and progress.preview_size() == 256
    assert latent_preview.decoder_preview("glm_image") is None      # no VAE given, no release to take one from
    # loading a VAE changes no other node's previews (there is no "last VAE loaded")
    (loaded,) = NODE_CLASS_MAPPINGS["GLMImageVAELoader"]().load(release, "fp32")
    assert latent_preview.latent_family(loaded.model) == "glm_image"
    assert latent_preview.decoder_preview("glm_image") is None
    # the workflow's VAE (the samplers' optional vae input)
    assert isinstance(latent_preview.decoder_preview("glm_image", loaded.model), latent_preview.LatentPreview)
    assert latent_preview.decoder_preview("cogview4", vae) is not None  # a node with a VAE input passes its own
    # the per-handle default: the VAE of the decoder's own release, fitted once per release
    decoder = os.path.join(release, "transformer")
    preview = latent_preview.decoder_preview("glm_image", release=decoder)
    assert isinstance(preview, latent_preview.LatentPreview)
    assert torch.equal(preview.factors.weights, latent_preview.latent_rgb_for(vae).weights)
    assert latent_preview.decoder_preview("cogview4", release=decoder) is None  # another latent space
    comfy_args.preview_method = types.SimpleNamespace(value="taesd")  # no TAESD exists: falls back to latent2rgb
    assert isinstance(latent_preview.decoder_preview("glm_image", release=release), latent_preview.LatentPreview)
    comfy_args.preview_method = types.SimpleNamespace(value="none")
    assert latent_preview.decoder_preview("glm_image", release=release) is None
    assert token_preview.ar_preview(object()) is None


def test_progress_hands_comfyui_what_its_latent_previewers_send(monkeypatch):
    calls = []

    class ProgressBar:  # comfy.utils.ProgressBar's interface
        def __init__(self, total):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.current = value
            calls.append((value, total, preview))

    monkeypatch.setattr(progress, "_comfy_utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    frame = Image.new("RGB", (8, 8))
    with progress.Progress(3) as bar:
        bar.update()
        bar.update(preview=frame)
        bar.update(preview=None)
    assert calls == [(1, 3, None), (2, 3, ("JPEG", frame, 512)), (3, 3, None)]


def test_decoder_previews_each_steps_denoised_estimate(release, vae):
    decoder = load_decoder(release, dtype="fp32", device="cpu")
    factors = latent_preview.fit_latent_rgb(vae)
    seen = []

    def preview(denoised):
        seen.append(denoised.clone())
        return latent_preview.LatentPreview(factors)(denoised)

    glyph = GlyphConditioning(cond=torch.randn(1, 3, 32), uncond=torch.randn(1, 1, 32))
    ids = torch.randint(0, 16384, (1, 16 * 16))
    latents = sample_latents(decoder, ids, glyph, 256, 256, settings=DecoderRun(steps=3, guidance=1.5, seed=1),
                             preview=preview,
                             progress=False)
    assert len(seen) == 3 and all(s.shape == latents.shape for s in seen)
    # the schedule ends at sigma 0, so the last step's estimate is the result
    torch.testing.assert_close(seen[-1], latents, rtol=0, atol=1e-5)
    assert not torch.allclose(seen[0], latents, atol=1e-2)
    image = latent_preview.LatentPreview(factors)(latents)
    assert image.size == (32, 32) and image.mode == "RGB"
    expected = ((factors.rgb(latents[0]) + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(image), expected)


def test_ar_preview_redraws_the_grid_after_each_row(release, monkeypatch):
    model = load_ar_model(release, dtype="fp32", device="cpu")
    tokenizer = load_text_tokenizer(release)
    frames = []
    preview = token_preview.ARPreview(model)

    def record(written, grids):
        image = preview(written, grids)
        if image is not None:
            frames.append((written.shape[1], image))
        return image

    grid = generate_token_grid(model, tokenizer, "a red door", 512, 512, settings=ARSampling(seed=3), preview=record,
                               progress=False)
    t = target_grid(512, 512)
    # one frame per finished row: the preview grid's rows, then the token grid's
    assert [n for n, _ in frames] == [t.pw * (r + 1) for r in range(t.ph)] + \
        [t.ph * t.pw + t.tw * (r + 1) for r in range(t.th)]
    colours = token_preview.palette(ar_model=model)
    cell = 512 // max(t.th, t.tw)
    assert frames[-1][1].size == (t.tw * cell, t.th * cell)
    assert np.array_equal(np.asarray(frames[-1][1]), np.asarray(token_preview.grid_image(grid.ids[0], colours, cell)))
    first = np.asarray(frames[t.ph][1])                            # one row of the token grid written
    assert (first[cell:] == token_preview.UNWRITTEN).all() and not (first[:cell] == token_preview.UNWRITTEN).all()


def test_palette_colours_like_codes_alike():
    vectors = torch.randn(1000, 24, generator=torch.Generator().manual_seed(0))
    vectors[1] = vectors[0]
    vectors[2] = vectors[0] + 1e-3 * torch.randn(24)
    colours = token_preview.pca_palette(vectors)
    assert colours.shape == (1000, 3) and colours.dtype == torch.uint8
    assert torch.equal(colours[0], colours[1])
    assert (colours[0].int() - colours[2].int()).abs().max() <= 2
    torch.manual_seed(123)                                              # pca_lowrank projects randomly
    assert torch.equal(token_preview.pca_palette(vectors), colours)     # the same colours every run
    spread = colours.float().std(dim=0)
    assert (spread > 40).all(), spread                                  # the colours use the range
    assert torch.equal(token_preview.id_palette(), token_preview.id_palette())


def test_token_grid_preview_node(release):
    ids = torch.randint(0, 16384, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    preview_ids = torch.randint(0, 16384, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    tokens = TokenGrid(ids=ids, height=128, width=192, preview=preview_ids)
    node = NODE_CLASS_MAPPINGS["GLMImageTokenGridPreview"]()
    (image,) = node.draw(tokens, "tokens")
    assert image.shape == (2, 128, 192, 3) and image.dtype == torch.float32
    colours = token_preview.id_palette()
    # every 32x32 block is its token's colour
    assert torch.equal((image[1, ::32, ::32] * 255).round().to(torch.uint8), colours[ids[1]])
    assert torch.equal(image[1, 32:64, 64:96], image[1, 32:33, 64:65].expand(32, 32, 3))
    (small,) = node.draw(tokens, "preview")
    assert small.shape == (2, 128, 192, 3)
    ar = ARModel(model=load_ar_model(release, dtype="fp32", device="cpu"), tokenizer=load_text_tokenizer(release))
    (coloured,) = node.draw(tokens, "tokens", ar_model=ar)
    palette = token_preview.palette(ar_model=ar.model)
    assert torch.equal((coloured[0, ::32, ::32] * 255).round().to(torch.uint8), palette[ids[0]])
    with pytest.raises(ValueError, match="no preview grid"):
        node.draw(TokenGrid(ids=ids, height=128, width=192), "preview")


def test_demo_writes_the_previews(tmp_path, monkeypatch):
    import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the demo's per-user cache folder
    folder = tmp_path / "previews"
    assert demo.main(["--out", str(tmp_path / "out"), "--previews", str(folder), "--steps", "2"]) == 0
    ar = sorted(folder.glob("glm_image_ar_tokens_*.png"))
    decoder = sorted(folder.glob("glm_image_decoder_*.png"))
    assert len(ar) == 32 and len(decoder) == 2               # 512x512: 16 + 16 grid rows, 2 decoder steps
    with Image.open(decoder[-1]) as last, Image.open(ar[-1]) as grid:
        assert last.size == (64, 64) and grid.size == (512, 512)
