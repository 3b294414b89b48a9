"""Bad and hostile inputs, by class: each gets a clear early error that names the input and the fix, the node's
VALIDATE_INPUTS (what ComfyUI calls before loading anything) gives the same message as the node at run time, and
the models loaded from the tiny release still give the same outputs afterwards.

Classes: sizes, numbers (seeds over exactly the widget's range, non-finite floats, upper bounds), text (invalid
Unicode, length, too much glyph text), tensors (empty, wrong rank, not a LATENT, NaN), outputs with NaN or inf,
an AR prefill that would not fit in memory.
"""
import math

import pytest
import torch
from glm_image_nodes.core.host import memory
from glm_image_nodes.core.runtime import checks
from glm_image_nodes.core.runtime.checks import MAX_SEED, NonFiniteOutput
from glm_image_nodes.core.stages import ar_sampling, handles
from glm_image_nodes.core.stages.ar_prompt import build_ar_inputs
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.decoder_sampling import sample_latents
from glm_image_nodes.core.stages.glyph import glyph_conditioning
from glm_image_nodes.core.stages.handles import TokenGrid
from glm_image_nodes.core.stages.settings import ARSampling, DecoderRun
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.testing.tiny_release import write_tiny_release

SURROGATE = "a sign that says \ud800"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_tiny_release(str(tmp_path_factory.mktemp("tiny") / "GLM-Image"))
    load = {name: NODES[node]().load(root, "fp32")[0] for name, node in (
        ("ar", "GLMImageARLoader"), ("glyph_encoder", "GLMImageGlyphEncoderLoader"),
        ("decoder", "GLMImageDecoderLoader"), ("vae", "GLMImageVAELoader"), ("tokenizer", "GLMImageTokenizerLoader"))}
    return load


def outputs(models) -> list[torch.Tensor]:
    """Small outputs of every loaded model: AR ids (editing, 2x2 grid), glyph embeddings, a 2-step decoder
    latent, its VAE decode and re-encode, semantic tokens."""
    ar = models["ar"]
    ids = generate_token_grid(ar.model, ar.tokenizer, "a cat", 64, 64, settings=ARSampling(seed=3),
                              source_grids=[torch.tensor([[1, 2], [3, 4]])], progress=False).ids
    glyph = glyph_conditioning(models["glyph_encoder"].model, 'a sign that says "OPEN"')
    tokens = TokenGrid(ids=ids, height=64, width=64)
    latent = sample_latents(models["decoder"].model, tokens.upsampled(), glyph, 64, 64, settings=DecoderRun(steps=2,
                                                                                                            seed=5),
                            progress=False)
    image = models["vae"].model.decode(latent)
    tokenizer = NODES["GLMImageImageToTokens"]().tokenize(models["tokenizer"], image, 64, 64)[0].ids
    return [ids, glyph.cond, latent, image, models["vae"].model.encode(image), tokenizer]


@pytest.fixture(scope="module")
def baseline(models):
    return outputs(models)


def assert_unchanged(models, baseline):
    for before, after in zip(baseline, outputs(models)):
        assert torch.equal(before, after)


def same_message(node: str, method: str, kwargs: dict, validate: dict) -> str:
    """The node refuses ``kwargs`` at run time; VALIDATE_INPUTS refuses ``validate`` with the same message."""
    answer = NODES[node].VALIDATE_INPUTS(**validate)
    assert isinstance(answer, str), answer
    with pytest.raises(ValueError) as error:
        getattr(NODES[node](), method)(**kwargs)
    assert str(error.value) == answer
    return answer


AR = dict(prompt="a cat", width=512, height=512, seed=0, temperature=0.9, top_p=0.75, top_k=16512, num_images=1)
DECODER = dict(seed=0, steps=2, guidance=1.5)
COGVIEW4 = dict(width=1024, height=1024, seed=0, steps=50, guidance=5.0, num_images=1)
UPSCALE = dict(seed=0, steps=30, guidance=1.5, strength=1.0)
REFINE = dict(scale=2.0, seed=0, steps=30, guidance=5.0, strength=0.5)
CAPTION = dict(max_new_tokens=64, temperature=0.0, seed=0, custom_instruction="", append="")

NUMBER_CASES = [  # node, method, widgets, change, (what the message must say: the input ... the fix)
    ("GLMImageARSampler", "sample", AR, dict(seed=-1), ("seed = -1", f"Use a seed in 0..{MAX_SEED}")),
    ("GLMImageARSampler", "sample", AR, dict(seed=2 ** 64), (f"seed = {2 ** 64}", "2^64 - 1")),
    ("GLMImageARSampler", "sample", AR, dict(temperature=math.nan),
     ("temperature must be a finite number", "at least 0")),
    ("GLMImageARSampler", "sample", AR, dict(top_p=math.inf), ("top_p must be a finite number", "(0, 1]")),
    ("GLMImageARSampler", "sample", AR, dict(num_images=17), ("num_images = 17", "Use 1..16")),
    ("GLMImageARSampler", "sample", AR, dict(width=1000),
     ("1000x512 (WxH) is not one", "nearest valid size is 992x512")),
    ("GLMImageDecoderSampler", "sample", DECODER, dict(guidance=math.nan), ("guidance must be a finite number", "1.0")),
    ("GLMImageDecoderSampler", "sample", DECODER, dict(steps=201), ("steps = 201", "Use 1..200 steps")),
    ("GLMImageDecoderSampler", "sample", DECODER, dict(seed=-5), ("seed = -5", "Use a seed")),
    ("GLMImageCogView4Sampler", "sample", COGVIEW4, dict(width=4000), ("4000x1024", "Valid sizes include")),
    ("GLMImageCogView4Sampler", "sample", COGVIEW4, dict(num_images=0), ("num_images = 0", "Use 1..16")),
    ("GLMImageCogView4Sampler", "sample", COGVIEW4, dict(guidance=-math.inf), ("guidance must be a finite", "1.0")),
    ("GLMImageUpscale", "upscale", UPSCALE, dict(strength=math.nan), ("strength must be a finite", "(0, 1]")),
    ("GLMImageUpscale", "upscale", UPSCALE, dict(strength=0.0), ("strength = 0", "1 decodes from pure noise")),
    ("GLMImageCogView4Refine", "refine", REFINE, dict(scale=math.inf), ("scale must be a finite", "1.0..2")),
    ("GLMImageCogView4Refine", "refine", REFINE, dict(scale=3.0), ("scale = 3", "output size over input size")),
    ("GLMImageCaption", "caption", CAPTION, dict(max_new_tokens=0), ("max_new_tokens = 0", "1024 or more")),
    ("GLMImageCaption", "caption", CAPTION, dict(temperature=math.nan), ("temperature must be a finite", "greedy")),
    ("GLMImageImageToTokens", "tokenize", dict(width=1024, height=1024), dict(width=100),
     ("100x1024", "Choose a size such as 1024x1024")),
]
TEXT_CASES = [
    ("GLMImageARSampler", "sample", AR, dict(prompt=SURROGATE), ("prompt holds invalid Unicode", "U+D800",
                                                                  "Delete that character")),
    ("GLMImageARSampler", "sample", AR, dict(prompt="a" * 40000), ("prompt is 40000 characters", "shorten it")),
    ("GLMImageGlyphConditioning", "encode", dict(prompt="x", texts=""), dict(texts=SURROGATE),
     ("glyph text 1 holds invalid Unicode", "Delete that character")),
    ("GLMImageGlyphConditioning", "encode", dict(prompt="x", texts=""), dict(texts="\n".join(["y" * 2000] * 9)),
     ("9 glyph texts", "list only the texts to render")),
    ("GLMImageCogView4TextEncode", "encode", dict(prompt="x", negative_prompt=""), dict(negative_prompt=SURROGATE),
     ("negative_prompt holds invalid Unicode",)),
    ("GLMImageCaption", "caption", CAPTION, dict(custom_instruction=SURROGATE), ("custom_instruction holds invalid",)),
    ("GLMImageRerank", "rerank", dict(prompt="x"), dict(prompt="  "), ("prompt is empty", "give the prompt")),
]
SOCKETS = {"GLMImageARSampler": dict(ar_model=None),
           "GLMImageDecoderSampler": dict(decoder=None, tokens=None, glyph=None),
           "GLMImageCogView4Sampler": dict(decoder=None, conditioning=None),
           "GLMImageUpscale": dict(decoder=None, vae=None, tokenizer=None, glyph=None, image=None, use_reference=True),
           "GLMImageCogView4Refine": dict(decoder=None, vae=None, conditioning=None, image=None),
           "GLMImageCaption": dict(captioner=None, image=None, preset="short caption"),
           "GLMImageImageToTokens": dict(tokenizer=None, image=None),
           "GLMImageGlyphConditioning": dict(glyph_encoder=None),
           "GLMImageCogView4TextEncode": dict(text_encoder=None), "GLMImageRerank": dict(captioner=None, images=None)}


@pytest.mark.parametrize("node, method, widgets, change, says", NUMBER_CASES + TEXT_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[3])}" for c in NUMBER_CASES + TEXT_CASES])
def test_validate_inputs_refuses_before_loading_with_the_core_message(node, method, widgets, change, says):
    """No model is connected (None): the check runs before any model is touched, at validation and at run time."""
    values = {**widgets, **change}
    message = same_message(node, method, {**SOCKETS[node], **values}, values)
    for part in says:
        assert part in message, (part, message)
    assert NODES[node].VALIDATE_INPUTS(**widgets) is True


def test_linked_inputs_are_left_for_run_time():
    assert NODES["GLMImageARSampler"].VALIDATE_INPUTS(**{**AR, "prompt": None, "seed": None}) is True
    assert NODES["GLMImageGlyphConditioning"].VALIDATE_INPUTS(prompt=None) is True
    # 0 x 0 takes the reference's size, known only when the node runs
    assert NODES["GLMImageARSampler"].VALIDATE_INPUTS(**{**AR, "width": 0, "height": 0}) is True


def test_seeds_run_over_exactly_the_widget_range(models, baseline):
    ar = models["ar"]
    grids = [NODES["GLMImageARSampler"]().sample(ar, "a cat", 512, 512, seed, 0.9, 0.75, 16512, 1)[0].ids
             for seed in (0, MAX_SEED)]
    assert not torch.equal(*grids)
    for seed in (-1, MAX_SEED + 1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            checks.check_seed(seed)
    with pytest.raises(ValueError, match=r"seed = -1 is out of range.*Use a seed in 0\.\.18446744073709551615"):
        sample_latents(models["decoder"].model, torch.zeros(1, 16, dtype=torch.long), glyph_conditioning(
            models["glyph_encoder"].model, "x"), 64, 64, settings=DecoderRun(steps=1, seed=-1))
    assert_unchanged(models, baseline)


def test_core_upper_bounds_hold_without_widgets(models, baseline):
    ar, tokens = models["ar"], torch.zeros(1, 16, dtype=torch.long)
    glyph = glyph_conditioning(models["glyph_encoder"].model, "x")
    with pytest.raises(ValueError, match="num_images = 17 is out of range: it must be 1..16"):
        generate_token_grid(ar.model, ar.tokenizer, "a cat", 64, 64, settings=ARSampling(seed=0, num_images=17))
    with pytest.raises(ValueError, match="steps = 1000 is out of range: it must be 1..200"):
        sample_latents(models["decoder"].model, tokens, glyph, 64, 64, settings=DecoderRun(steps=1000))
    with pytest.raises(ValueError, match=r"prompt is 40000 characters long, over the 32768"):
        generate_token_grid(ar.model, ar.tokenizer, "a" * 40000, 64, 64, settings=ARSampling(seed=0))
    with pytest.raises(ValueError, match="image holds 65 images, over the 64 this node takes at once: split"):
        NODES["GLMImageVAEEncode"]().encode(models["vae"], torch.rand(65, 8, 8, 3))
    assert_unchanged(models, baseline)


def test_text_that_no_tokenizer_can_encode(models, baseline):
    ar = models["ar"]
    with pytest.raises(ValueError,
                       match="prompt holds invalid Unicode: an unpaired surrogate U\\+D800 at character 17"):
        generate_token_grid(ar.model, ar.tokenizer, SURROGATE, 64, 64, settings=ARSampling(seed=0))
    with pytest.raises(ValueError, match="prompt holds invalid Unicode"):
        NODES["GLMImageGlyphConditioning"]().encode(models["glyph_encoder"], SURROGATE)
    with pytest.raises(ValueError, match="glyph text 1 holds invalid Unicode"):
        glyph_conditioning(models["glyph_encoder"].model, "x", texts=["\udfff"])
    assert_unchanged(models, baseline)


def test_tensors_that_are_not_what_the_node_needs(models, baseline):
    vae, tokenizer = models["vae"], models["tokenizer"]
    cases = [
        (lambda: NODES["GLMImageVAEDecode"]().decode(vae, {"latent": torch.zeros(1, 16, 8, 8)}, "auto"),
         "latent must be a LATENT (a dict with 'samples' [B, C, H, W]), got a dict with keys ['latent']"),
        (lambda: NODES["GLMImageVAEDecode"]().decode(vae, {"samples": torch.zeros(16, 8, 8)}, "auto"),
         "latent['samples'] must be a tensor [B, C, H, W], got shape (16, 8, 8)"),
        (lambda: NODES["GLMImageVAEDecode"]().decode(vae, {"samples": torch.zeros(0, 16, 8, 8)}, "auto"),
         "latent is empty (shape (0, 16, 8, 8))"),
        (lambda: NODES["GLMImageVAEDecode"]().decode(vae, {"samples": torch.full((1, 16, 8, 8), math.nan)}, "auto"),
         "latent holds 1024 NaN or inf values of 1024"),
        (lambda: NODES["GLMImageVAEEncode"]().encode(vae, torch.rand(1, 0, 64, 3)),
         "image is empty (shape (1, 0, 64, 3)): the node before it produced no image"),
        (lambda: NODES["GLMImageVAEEncode"]().encode(vae, torch.rand(64, 64, 3)),
         "image must be an IMAGE [B, H, W, 3], got a tensor of shape (64, 64, 3)"),
        (lambda: NODES["GLMImageVAEEncode"]().encode(vae, {"samples": torch.rand(1, 64, 64, 3)}),
         "image must be an IMAGE (a tensor [B, H, W, 3]), got dict"),
        (lambda: NODES["GLMImageReferenceImages"]().prepare(vae, tokenizer, torch.rand(1, 64, 64, 3),
                                                            image_2=torch.rand(0, 64, 64, 3)),
         "image_2 is empty"),
        (lambda: NODES["GLMImageImageToTokens"]().tokenize(tokenizer, torch.full((1, 64, 64, 3), math.inf), 64, 64),
         "image holds 12288 NaN or inf values"),
        (lambda: NODES["GLMImageCogViewVQDecode"]().decode(handles.ModelHandle(type("VQ", (), {"n_embed": 8192})()),
                                                          torch.rand(1, 4, 4)),
         "tokens must hold integer token ids [B, h, w], got torch.float32"),
        (lambda: NODES["GLMImageDecoderSampler"]().sample(models["decoder"], TokenGrid(
            torch.zeros(1, 4, 2, dtype=torch.long), 64, 64), None, 0, 2, 1.5),
         "needs [B, 2, 2] (H/32, W/32)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value), (message, str(error.value))
    assert_unchanged(models, baseline)


def test_non_finite_outputs_name_the_stage_and_cause(models, baseline):
    decoder, vae = models["decoder"].model, models["vae"]
    glyph = glyph_conditioning(models["glyph_encoder"].model, "x")
    weight = next(decoder.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(math.nan)
    try:
        with pytest.raises(NonFiniteOutput, match=r"GLM-Image decoder sampling \(2 steps\) produced 1024 NaN or "
                                                  r"inf values of 1024; it is not passed on: the checkpoint"):
            sample_latents(decoder, torch.zeros(1, 16, dtype=torch.long), glyph, 64, 64, settings=DecoderRun(steps=2))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    bias = vae.module.decoder.conv_out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(math.inf)
    try:
        with pytest.raises(NonFiniteOutput, match="VAE decode produced .* NaN or inf values"):
            NODES["GLMImageVAEDecode"]().decode(vae, {"samples": torch.zeros(1, 16, 8, 8)}, "off")
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    with pytest.raises(NonFiniteOutput, match="runs in fp16, whose range its activations exceed: load it in bf16"):
        checks.check_finite_output(torch.tensor([math.inf]), "The glyph encoder", torch.float16)
    assert_unchanged(models, baseline)


def test_a_prefill_that_would_not_fit_is_refused_before_allocating(models, baseline, monkeypatch):
    ar = models["ar"]
    allocated = []
    monkeypatch.setattr(ar.model, "new_cache", lambda *a, **k: allocated.append(a))
    monkeypatch.setattr(ar_sampling, "available_memory", lambda device, need: 1 << 20)
    with pytest.raises(memory.OutOfMemory) as error:
        generate_token_grid(ar.model, ar.tokenizer, "a cat " * 200, 1024, 1024,
                            settings=ARSampling(seed=0, num_images=4))
    message = str(error.value)
    inputs = build_ar_inputs(ar.tokenizer, ["a cat " * 200] * 4, 1024, 1024)
    length = inputs.input_ids.shape[1]
    need = ar.model.generation_bytes(4, length, length + inputs.num_new_tokens - 1, False)
    assert f"AR token sampling of a {length}-token prompt for 4 image(s) needs about {need / 2 ** 30:.1f} GB" in message
    assert "only 0.0 GB are free on cpu: shorten the prompt, or lower num_images or the output size" in message
    assert not allocated
    monkeypatch.undo()
    assert_unchanged(models, baseline)


def test_generation_bytes_counts_the_cache_and_prefill():
    from glm_image_nodes.core.models.glm_ar import ARConfig, GlmImageAR
    with torch.device("meta"):
        model = GlmImageAR(ARConfig.from_text_config({})).to(torch.bfloat16)  # the release's 9B shapes
    # KV cache: 40 layers x K and V x 2 heads x 128 x 2 bytes = 40960 bytes per slot
    assert model.generation_bytes(1, 0, 1000, False) == 40960 * 1000
    # prefill: (4 * 4096 + (32 + 4) * 128 + 3 * 13696) * 2 bytes per prompt token, plus an L x L mask when padded
    per_token = (4 * 4096 + 36 * 128 + 3 * 13696) * 2
    assert model.generation_bytes(2, 100, 0, True) == 2 * 100 * per_token + 2 * 100 * 100
