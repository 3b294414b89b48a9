"""Glyph path parity against diffusers ``GlmImagePipeline`` (extraction, tokenization, embeddings) and
transformers ``T5EncoderModel``, on a tiny random T5 saved in the release layout."""
import functools
import json
import types
import warnings

import pytest
import torch
from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.t5_encoder import load_glyph_encoder
from glm_image_nodes.core.stages.glyph import (
    encode_glyph_texts,
    extract_glyph_texts,
    glyph_conditioning,
    tokenize_glyph_texts,
)
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

ATOL = 1e-5  # fp32, max abs error
PROMPTS = [
    'A poster that says "GRAND OPENING" and \'50% off\' with “限时优惠” and 「春节快乐」',
    "It's Bob's café, a sign reads 'OPEN'",  # apostrophes in words make bogus spans
    "A quiet lake at dawn, no text at all",
    'Two signs: "LEFT" and "RIGHT", then "CENTER"',
    '“first” "second" \'third\' “fourth”',
    'An empty quote "" and an unterminated "one',
    "",
]
TEXT_SETS = [["HELLO"], ["ab", "longer text 中文"], ["x", "", "three <pad> é"], [""]]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_image")
    config = T5Config(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, vocab_size=384,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    torch.manual_seed(0)
    reference = T5EncoderModel(config).eval()
    with torch.no_grad():  # give the norms non-trivial weights
        for name, p in reference.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
    reference.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    tokenizer = ByT5Tokenizer.from_pretrained(root / "tokenizer")
    return root, reference, tokenizer


class Recorder(torch.nn.Module):
    """The reference encoder, remembering what the pipeline fed it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return self.model(input_ids, attention_mask=attention_mask)


def pipeline(tokenizer, text_encoder):
    """Just enough of a ``GlmImagePipeline`` for its glyph methods to run unbound."""
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, _execution_device=torch.device("cpu"))
    pipe.get_glyph_texts = functools.partial(GlmImagePipeline.get_glyph_texts, pipe)
    pipe._get_glyph_embeds = functools.partial(GlmImagePipeline._get_glyph_embeds, pipe)
    return pipe


def prompt_for(texts):
    return " ".join(f'"{t}"' for t in texts) if texts != [""] else "no quotes"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_extraction_matches_pipeline(prompt):
    expected = GlmImagePipeline.get_glyph_texts(None, prompt)[0] or [""]
    assert extract_glyph_texts(prompt) == expected


def test_extraction_quirks():
    assert extract_glyph_texts("It's Bob's sign") == ["s Bob"]
    assert extract_glyph_texts('“b” "c" \'a\'') == ["a", "b", "c"]  # grouped by quote type, not position


@pytest.mark.parametrize("texts", TEXT_SETS)
def test_tokenization_matches_pipeline(release, texts):
    _, reference, tokenizer = release
    recorder = Recorder(reference)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline(tokenizer, recorder)._get_glyph_embeds(prompt_for(texts), 2048, torch.device("cpu"), torch.float32)
    (ref_ids, ref_mask), = recorder.calls
    ids, mask = tokenize_glyph_texts(texts)
    assert ids.tolist() == ref_ids.tolist()
    assert mask.tolist() == ref_mask.tolist()
    assert (ids[:, 0] == 0).all() == (len(texts) % 2 == 0)  # the even-count leading pad


@pytest.mark.parametrize("texts", TEXT_SETS)
def test_embeddings_match_pipeline(release, texts):
    root, reference, tokenizer = release
    encoder = load_glyph_encoder(str(root), dtype="fp32", device="cpu")
    with torch.no_grad():
        expected = pipeline(tokenizer, reference)._get_glyph_embeds(prompt_for(texts), 2048, torch.device("cpu"),
                                                                     torch.float32)
    got = encode_glyph_texts(encoder, texts)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < ATOL


def test_conditioning_matches_encode_prompt(release):
    root, reference, tokenizer = release
    encoder = load_glyph_encoder(str(root / "text_encoder"), dtype="fp32", device="cpu")
    prompt = PROMPTS[0]
    with torch.no_grad():
        cond, uncond = GlmImagePipeline.encode_prompt(pipeline(tokenizer, reference), prompt,
                                                      device=torch.device("cpu"), dtype=torch.float32)
    glyph = glyph_conditioning(encoder, prompt)
    assert glyph.texts == ["50% off", "限时优惠", "GRAND OPENING", "春节快乐"]
    assert glyph.cond.shape == cond.shape and glyph.uncond.shape == uncond.shape == (1, 1, 32)
    assert (glyph.cond - cond).abs().max().item() < ATOL
    assert (glyph.uncond - uncond).abs().max().item() < ATOL
    explicit = glyph_conditioning(encoder, prompt, texts=["only this"])
    assert explicit.texts == ["only this"]
    assert explicit.cond.shape[1] == len("only this") + 1


def test_bf16_close_to_reference_bf16(release):
    root, reference, _ = release
    encoder = load_glyph_encoder(str(root), dtype="bf16", device="cpu")
    assert encoder.shared.weight.dtype == torch.bfloat16
    ids, mask = tokenize_glyph_texts(["ab", "longer text"])
    with torch.no_grad():
        expected = T5EncoderModel.from_pretrained(root / "text_encoder", dtype=torch.bfloat16).eval()(
            ids, attention_mask=mask).last_hidden_state
        got = encoder(ids, mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() < 2e-2


def test_single_file_infers_config(release, tmp_path):
    root, reference, _ = release
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")  # only the tied alias
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)  # a full T5's decoder is ignored
    save_file(state, tmp_path / "glyph_byt5.safetensors")
    encoder = load_glyph_encoder(str(tmp_path / "glyph_byt5.safetensors"), dtype="fp32", device="cpu")
    cfg = encoder.config
    assert (cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers, cfg.vocab_size) == \
        (32, 48, 8, 4, 2, 384)
    ids, mask = tokenize_glyph_texts(["ab", "longer text 中文"])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
    assert (encoder(ids, mask) - expected).abs().max().item() < ATOL


def test_loader_errors(release, tmp_path):
    root, _, _ = release
    (tmp_path / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        load_glyph_encoder(str(tmp_path), dtype="fp32", device="cpu")
    with pytest.raises(CheckpointError, match="fp16"):
        load_glyph_encoder(str(root), dtype="fp16", device="cpu")
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a gated T5 encoder"):
        load_glyph_encoder(str(tmp_path / "vae.safetensors"), dtype="fp32", device="cpu")
