"""GLM-V captioner and CapS reranker on a tiny random Glm4vForConditionalGeneration release."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.captioner import (
    CAPS_INSTRUCTION,
    PRESETS,
    chat_inputs,
    load_captioner,
    strip_reasoning,
)
from glm_image_nodes.core.stages.captioning import caption_image, caption_scores, rerank

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_glmv import IMAGE_SIZE, reference_processor, write_tiny_glmv  # noqa: E402

PROMPT = 'A red fox on a sign that says "OPEN", at dusk'


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_glmv(str(tmp_path_factory.mktemp("glmv")))


@pytest.fixture(scope="module")
def captioner(release):
    return load_captioner(release, dtype="fp32", device="cpu")


def images(n, seed=1):
    return torch.rand(n, IMAGE_SIZE, IMAGE_SIZE, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_accepts_glmv_and_rejects_others(release, captioner, tmp_path):
    assert type(captioner.model).__name__ == "Glm4vForConditionalGeneration"
    assert captioner.model.dtype == torch.float32
    assert captioner.image_token == "<|image|>"

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type 'llama'.*LlamaForCausalLM.*GLM-4.6V-Flash"):
        load_captioner(str(other), device="cpu")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json.*GLM-4.1V"):
        load_captioner(str(empty), device="cpu")


def test_loader_refuses_the_fp8_choice(release):
    """fp8_e4m3fn is a choice of the pack's own loaders; the captioner must not take it as auto."""
    with pytest.raises(CheckpointError, match="no fp8_e4m3fn form: choose auto, bf16, fp32 or fp16"):
        load_captioner(release, dtype="fp8_e4m3fn", device="cpu")


def test_loader_says_how_to_install_transformers(release, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'transformers>=5'.*caption"):
        load_captioner(release, device="cpu")


def test_chat_inputs_match_glm4v_processor(captioner, monkeypatch):
    processor = reference_processor(captioner, monkeypatch)
    image = images(1)[0]
    ours = chat_inputs(captioner, image, "What is this?")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = (image * 255).round().to(torch.uint8).numpy()
    ref = processor(text=[text], images=[pil], return_tensors="pt", add_special_tokens=False)
    assert ours["input_ids"].shape[1] == 25 and (ours["input_ids"] == captioner.image_token_id).sum() == 4
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key].long(), ref[key].long()), key
    assert torch.allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-6)


def test_caption_presets_are_strings_and_deterministic(captioner):
    image = images(1)[0]
    for preset in PRESETS:
        first = caption_image(captioner, image, preset, max_new_tokens=8)
        assert isinstance(first, str)
        assert caption_image(captioner, image, preset, max_new_tokens=8) == first
    custom = caption_image(captioner, image, "short caption", max_new_tokens=8, custom_instruction="Name one color.")
    assert isinstance(custom, str)
    with pytest.raises(ValueError, match="unknown caption preset"):
        caption_image(captioner, image, "haiku")


def test_strip_reasoning():
    assert strip_reasoning("<think>hmm, a cat</think><answer>A cat on a mat.</answer><|user|>") == "A cat on a mat."
    assert strip_reasoning("\nplanning...</think>\n<|begin_of_box|>A dog<|end_of_box|><|endoftext|>") == "A dog"
    assert strip_reasoning(' A sign reading "OPEN". ') == 'A sign reading "OPEN".'
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        strip_reasoning("<think>still going")


@torch.no_grad()
def manual_caps(captioner, image, prompt):
    """Build the scored sequence as one string, run the model, log-softmax, gather, mean."""
    tok = captioner.tokenizer
    pixels = captioner.image_processor(images=[(image * 255).round().to(torch.uint8).numpy()], return_tensors="pt")
    n_image = int(pixels["image_grid_thw"][0].prod()) // 4
    text = ("[gMASK]<sop><|user|>\n<|begin_of_image|>" + "<|image|>" * n_image + "<|end_of_image|>"
            + CAPS_INSTRUCTION + "<|assistant|>\n" + prompt)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    logits = captioner.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=(ids == captioner.image_token_id).int(),
                             pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    positions = torch.arange(ids.shape[1] - n_prompt, ids.shape[1])
    return logprobs[positions - 1, ids[0, positions]].mean()


def test_caption_scores_match_manual_logits(captioner):
    batch = images(3)
    scores = caption_scores(captioner, batch, PROMPT)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    manual = torch.stack([manual_caps(captioner, image, PROMPT) for image in batch])
    err = (scores - manual).abs().max().item()
    assert err < 1e-5, err
    # the scores see the image: different images, different scores
    assert (scores.max() - scores.min()).item() > 1e-7


def test_caption_scores_follow_batch_order(captioner):
    batch = images(4, seed=2)
    scores = caption_scores(captioner, batch, PROMPT)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(caption_scores(captioner, batch[perm], PROMPT), scores[perm])
    order, rerank_scores = rerank(captioner, batch, PROMPT)
    assert torch.equal(rerank_scores, scores)
    assert torch.equal(order, torch.argsort(scores, descending=True))


def test_rerank_single_image(captioner):
    image = images(1, seed=3)
    order, scores = rerank(captioner, image, PROMPT)
    assert order.tolist() == [0] and scores.shape == (1,)
    assert torch.equal(scores, caption_scores(captioner, image, PROMPT))
    assert torch.isfinite(scores).all() and scores.item() < 0
