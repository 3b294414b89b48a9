"""CogView4 text encoding vs transformers ``GlmModel`` and diffusers ``CogView4Pipeline`` (tiny random, fp32)."""
import json
import logging
import os
import types

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from glm_image_nodes.core.formats.reading import CheckpointError  # noqa: E402
from glm_image_nodes.core.models import glm_text_encoder as gte  # noqa: E402
from glm_image_nodes.core.models.glm_text_encoder import load_glm_text_encoder  # noqa: E402
from glm_image_nodes.core.stages.cogview4_text import (  # noqa: E402
    cogview4_prompt_ids,
    encode_cogview4_prompt,
    load_cogview4_tokenizer,
)
from glm_image_nodes.testing.tiny_glm4_tokenizer import write_tiny_glm4_tokenizer  # noqa: E402

ATOL = 1e-5  # fp32 max abs error against the reference
LOGGER = "glm_image_nodes.core.stages.cogview4_text"
PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "x",
    "The words \"HELLO 2024\" on a neon sign,\n\tat night.  Double  spaces and émojis 🐱 and 中文 too",
    "literal specials: [gMASK]<sop> <|endoftext|> <|user|>",
    "",
]


def tiny_glm(vocab_size, pad_token_id, **overrides):
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
               attention_bias=True, rms_norm_eps=1.5625e-07, pad_token_id=pad_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    model = transformers.GlmModel(transformers.GlmConfig(**cfg)).eval()
    with torch.no_grad():  # the default init leaves biases at 0 and norms at 1; make every tensor matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogview4")
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "CogView4Pipeline"}, f)
    write_tiny_glm4_tokenizer(str(root / "tiny_src"))
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(root / "tiny_src"))
    hf_tok.save_pretrained(str(root / "tokenizer"))
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    ref = tiny_glm(len(hf_tok), hf_tok.pad_token_id)
    ref.save_pretrained(str(root / "text_encoder"), max_shard_size="40KB")  # sharded + index, like the release
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(root / "text_encoder"))
    return types.SimpleNamespace(root=str(root), ref=ref, hf_tok=hf_tok)


def pipeline_stub(hf_tok, ref, seen_ids):
    """The minimal object ``CogView4Pipeline._get_glm_embeds`` / ``encode_prompt`` run on; records the ids."""
    def text_encoder(ids, output_hidden_states):
        seen_ids.append(ids)
        return ref(ids, output_hidden_states=output_hidden_states)

    stub = types.SimpleNamespace(tokenizer=hf_tok, text_encoder=text_encoder)
    stub._get_glm_embeds = types.MethodType(diffusers.CogView4Pipeline._get_glm_embeds, stub)
    return stub


def test_hidden_states_match_glm_model(release):
    encoder = load_glm_text_encoder(release.root, dtype="fp32", device="cpu")
    assert len(encoder.layers) == 2
    ids = torch.randint(0, release.ref.config.vocab_size, (2, 37))
    with torch.no_grad():
        want = release.ref(ids, output_hidden_states=True).hidden_states[-2]
    got = encoder(ids)
    err = (got - want).abs().max().item()
    print(f"hidden_states[-2] max abs err {err:.3g}")
    assert got.shape == want.shape == (2, 37, 64)
    assert err < ATOL


def test_bf16_matches_glm_model_in_bf16(release):
    encoder = load_glm_text_encoder(release.root, dtype="bf16", device="cpu")
    ref = transformers.GlmModel.from_pretrained(os.path.join(release.root, "text_encoder"), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 40))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True).hidden_states[-2].float()
    got = encoder(ids)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_real_config_is_the_default():
    real = {  # THUDM/CogView4-6B text_encoder/config.json (transformers 5 layout), the fields that matter
        "architectures": ["GlmModel"], "model_type": "glm", "vocab_size": 151552, "hidden_size": 4096,
        "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2,
        "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1.5625e-07, "attention_bias": True,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
        "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "tie_word_embeddings": False}
    assert gte.GlmConfig.from_dict(real, "reference") == gte.GlmConfig()
    legacy = {k: v for k, v in real.items() if k != "rope_parameters"} | {"partial_rotary_factor": 0.5}  # 4.x layout
    assert gte.GlmConfig.from_dict(legacy, "reference") == gte.GlmConfig()


def test_ids_and_embeddings_match_pipeline(release):
    encoder = load_glm_text_encoder(os.path.join(release.root, "text_encoder"), dtype="fp32", device="cpu")
    tokenizer = load_cogview4_tokenizer(release.root)
    seen = []
    stub = pipeline_stub(release.hf_tok, release.ref, seen)
    for prompt in PROMPTS:
        seen.clear()
        with torch.no_grad():
            want = stub._get_glm_embeds(prompt, 1024, torch.device("cpu"), torch.float32)
        ids = cogview4_prompt_ids(tokenizer, prompt)
        assert ids.shape[1] % 16 == 0
        assert torch.equal(ids, seen[0]), prompt
        got = encode_cogview4_prompt(encoder, tokenizer, prompt)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() < ATOL
    prefix = release.hf_tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    short = cogview4_prompt_ids(tokenizer, "x")[0].tolist()
    assert len(short) == 16 and short[:13] == [release.hf_tok.pad_token_id] * 13 and short[13:15] == prefix
    exact = next(p for p in ("x " * n for n in range(1, 30)) if len(release.hf_tok(p).input_ids) == 16)
    assert cogview4_prompt_ids(tokenizer, exact)[0, :2].tolist() == prefix  # already 16 long: no pad
    assert cogview4_prompt_ids(tokenizer, exact + "x").shape == (1, 32)


def test_encode_prompt_positive_and_empty_negative(release):
    encoder = load_glm_text_encoder(release.root, dtype="fp32", device="cpu")
    tokenizer = load_cogview4_tokenizer(os.path.join(release.root, "tokenizer"))
    stub = pipeline_stub(release.hf_tok, release.ref, [])
    prompt = "a bowl of ramen with an egg, studio lighting"
    with torch.no_grad():
        want_pos, want_neg = diffusers.CogView4Pipeline.encode_prompt(
            stub, prompt, negative_prompt=None, do_classifier_free_guidance=True,
            device=torch.device("cpu"), dtype=torch.float32)
    got_pos = encode_cogview4_prompt(encoder, tokenizer, prompt)
    got_neg = encode_cogview4_prompt(encoder, tokenizer, "")
    assert got_pos.shape == want_pos.shape and got_neg.shape == want_neg.shape == (1, 16, 64)
    err = max((got_pos - want_pos).abs().max().item(), (got_neg - want_neg).abs().max().item())
    print(f"encode_prompt max abs err {err:.3g}")
    assert err < ATOL


def test_tokenizer_written_without_transformers_matches(release):
    ours = load_cogview4_tokenizer(os.path.join(release.root, "tiny_src", "tokenizer.json"))
    for prompt in PROMPTS:
        want = release.hf_tok(prompt, add_special_tokens=True).input_ids
        assert ours.encode(prompt) == want
    assert ours.pad_token_id == release.hf_tok.pad_token_id


def test_long_prompt_truncated_with_warning(release, caplog):
    encoder = load_glm_text_encoder(release.root, dtype="fp32", device="cpu")
    tokenizer = load_cogview4_tokenizer(release.root)
    long_prompt = "a cat on a table, " * 300  # well over 1024 tokens
    full = release.hf_tok(long_prompt).input_ids
    assert len(full) > 1100
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = cogview4_prompt_ids(tokenizer, "short prompt")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = encode_cogview4_prompt(encoder, tokenizer, long_prompt)
    assert any("1024" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    seen = []
    with torch.no_grad():
        want = pipeline_stub(release.hf_tok, release.ref, seen)._get_glm_embeds(
            long_prompt, 1024, torch.device("cpu"), torch.float32)
    ids = cogview4_prompt_ids(tokenizer, long_prompt)
    assert ids.shape == (1, 1024) and torch.equal(ids, seen[0])
    assert ids[0, :1023].tolist() == full[:1023]
    assert (got - want).abs().max().item() < ATOL


def test_last_layer_and_final_norm_not_loaded(release, monkeypatch):
    from glm_image_nodes.core.formats.checkpoint import Checkpoint

    loaded = []
    real = Checkpoint.load

    def spy(self, names):
        sd = real(self, names)
        loaded.extend(sd)
        return sd

    monkeypatch.setattr(Checkpoint, "load", spy)
    encoder = load_glm_text_encoder(release.root, dtype="fp32", device="cpu")
    assert loaded and "embed_tokens.weight" in loaded and any(k.startswith("layers.1.") for k in loaded)
    assert "norm.weight" not in loaded
    assert not any(k.startswith("layers.2.") for k in loaded)
    assert set(encoder.state_dict()) == set(loaded)


def test_single_file_with_inferred_config(tmp_path):
    torch.manual_seed(1)
    # head_dim 128 as in the real model: a single file cannot tell heads from head_dim, so 128 is assumed
    ref = tiny_glm(300, 0, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    file = str(tmp_path / "glm4_text_encoder.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, file)
    encoder = load_glm_text_encoder(file, dtype="fp32", device="cpu")
    cfg = encoder.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (300, 256, 96, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_bias) == (2, 1, True)
    assert (cfg.rms_norm_eps, cfg.partial_rotary_factor) == (1.5625e-07, 0.5)
    ids = torch.randint(0, 300, (1, 21))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True).hidden_states[-2]
    err = (encoder(ids) - want).abs().max().item()
    print(f"single-file max abs err {err:.3g}")
    assert err < ATOL


def test_causal_lm_checkpoint_and_bad_inputs(tmp_path, release):
    lm = transformers.GlmForCausalLM(release.ref.config).eval()
    lm.model.load_state_dict(release.ref.state_dict())
    lm.save_pretrained(str(tmp_path / "lm"))
    encoder = load_glm_text_encoder(str(tmp_path / "lm"), dtype="fp32", device="cpu")  # "model." keys, lm_head skipped
    ids = torch.randint(0, release.ref.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = release.ref(ids, output_hidden_states=True).hidden_states[-2]
    assert (encoder(ids) - want).abs().max().item() < ATOL

    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a GLM-4"):
        load_glm_text_encoder(str(tmp_path / "other.safetensors"), device="cpu")
    with open(tmp_path / "lm" / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "glm4"
    with open(tmp_path / "lm" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="sandwich"):
        load_glm_text_encoder(str(tmp_path / "lm"), device="cpu")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_cogview4_tokenizer(str(tmp_path / "lm"))
