"""A release whose special-token ids and codebook differ from zai-org/GLM-Image's, saved by the reference classes
in the official layout, loads and runs: the ids come from its config.json and tokenizer, never from constants.

The tiny release has a 1152-id vision vocabulary, a 1024-entry codebook, the image markers at 1024/1025 and the
text ids shifted by 1152 (the real one: 16512, 16384, 16384/16385, +16512). Prompt ids and M-RoPE positions are
compared with ``GlmImageProcessor`` + ``get_rope_index`` of that release, logits with
``GlmImageForConditionalGeneration`` (fp32, CPU).
"""
import json

import pytest
import torch
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.stages.ar_prompt import ARVocabulary, build_ar_inputs, load_text_tokenizer, read_ar_vocabulary
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.settings import ARSampling
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.testing.tiny_glm_image_tokenizer import chat_template, special_id, write_tiny_glm_image_tokenizer
from PIL import Image
from tiny_glm_release import TEXT_CONFIG, VISION_CONFIG, rope_index_reference

VISION_VOCAB, CODEBOOK = 1152, 1024
LOGITS_ATOL = 2e-5  # fp32, as in test_ar_parity


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from transformers import (
        GlmImageConfig,
        GlmImageForConditionalGeneration,
        GlmImageProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    root = tmp_path_factory.mktemp("other_ids")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    text = dict(TEXT_CONFIG, vocab_size=VISION_VOCAB + 151360, vision_vocab_size=VISION_VOCAB,
                pad_token_id=special_id("<|endoftext|>", VISION_VOCAB), eos_token_id=CODEBOOK + 1)
    config = GlmImageConfig(text_config=text, vision_config=VISION_CONFIG,
                            vq_config=dict(embed_dim=16, num_embeddings=CODEBOOK, latent_channels=32),
                            image_token_id=special_id("<|image|>", VISION_VOCAB), image_start_token_id=CODEBOOK,
                            image_end_token_id=CODEBOOK + 1)
    torch.manual_seed(0)
    hf = GlmImageForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 1 if name.endswith("embed_tokens.weight") else 0.15)
    hf.save_pretrained(str(root / "vision_language_encoder"))
    write_tiny_glm_image_tokenizer(str(root / "tok"), VISION_VOCAB, CODEBOOK)
    image_processor = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1,
                                                min_pixels=32 * 32, max_pixels=1024 * 1024)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root / "tok"))
    GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                      chat_template=chat_template(CODEBOOK)).save_pretrained(str(root / "processor"))
    processor = GlmImageProcessor.from_pretrained(str(root / "processor"))
    model = load_ar_model(str(root), dtype="fp32", device="cpu")
    return root, hf, processor, model, load_text_tokenizer(str(root))


def test_the_vocabulary_is_read_from_the_config(release):
    root, _, _, model, tok = release
    expected = (CODEBOOK, CODEBOOK + 1, special_id("<|image|>", VISION_VOCAB), CODEBOOK, VISION_VOCAB)
    for path in (root, root / "vision_language_encoder", root / "processor"):
        v = read_ar_vocabulary(str(path))
        assert (v.image_start_id, v.image_end_id, v.image_token_id, v.codebook_size, v.vision_vocab_size) == expected
    assert (tok.image_start, tok.image_end) == (f"<|dit_token_{CODEBOOK}|>", f"<|dit_token_{CODEBOOK + 1}|>")
    assert tok.codebook_size == CODEBOOK and model.config.vision_vocab_size == VISION_VOCAB
    handle = NODES["GLMImageARLoader"]().load(str(root), "fp32")[0]  # what the AR socket carries
    assert handle.vocabulary.codebook_size == CODEBOOK and handle.vocabulary.image_start_id == CODEBOOK


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "i2i"])
def test_prompt_ids_and_positions_match_the_reference_processor(release, edit):
    _, _, processor, _, tok = release
    images = [Image.new("RGB", (96, 64), (200, 10, 10))] if edit else []
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": "a cat"}]
    ref = processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True, target_h=128,
                                        target_w=96, return_dict=True, return_tensors="pt")
    sources = [torch.tensor([[3, 1000, 1023], [0, 7, 512]])] if edit else None
    ids = ref["input_ids"]
    if edit:  # what the reference model does with the VQ ids: masked_scatter over the image placeholders
        assert ref["image_grid_thw"][0].tolist() == [1, 2, 3]
        ids = ids.masked_scatter(ids == tok.image_token_id, sources[0].flatten())
    ours = build_ar_inputs(tok, ["a cat"], 128, 96, source_grids=sources)
    assert ours.input_ids[0, 0] == (CODEBOOK if edit else ours.input_ids[0, 0])
    assert torch.equal(ours.input_ids, ids)
    positions, decode = rope_index_reference({**ref, "input_ids": ids}, CODEBOOK, CODEBOOK + 1)
    assert torch.equal(ours.position_ids, positions) and torch.equal(ours.decode_position_ids, decode)


def test_logits_match_and_sampling_stays_inside_the_codebook(release):
    _, hf, processor, model, tok = release
    messages = [[{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]]
    ref_inputs = processor.apply_chat_template(messages, tokenize=True, target_h=64, target_w=64, return_dict=True,
                                               return_tensors="pt")
    out = hf.generate(**ref_inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    ref_logits = torch.stack(out.logits, dim=1)
    tokens = out.sequences[:, ref_inputs["input_ids"].shape[1]:]
    inputs = build_ar_inputs(tok, ["a cat"], 64, 64)
    cache = model.new_cache(1, inputs.input_ids.shape[1] + 4)
    with torch.inference_mode():
        logits = [model(inputs.input_ids, inputs.position_ids, cache, 0)[:, -1]]
        for k in range(3):
            index = torch.tensor(inputs.input_ids.shape[1] + k)
            logits.append(model(tokens[:, k:k + 1], inputs.decode_position_ids[:, :, k:k + 1], cache, index)[:, -1])
    err = (torch.stack(logits, dim=1) - ref_logits).abs().max().item()
    assert ref_logits.shape[-1] == VISION_VOCAB and err < LOGITS_ATOL, err

    head = model.lm_head.weight.clone()
    model.lm_head.weight[CODEBOOK:] += 50 * model.lm_head.weight[CODEBOOK:].sign()  # reserved ids very likely
    try:
        grid = generate_token_grid(model, tok, "a cat", 64, 64, settings=ARSampling(seed=3))
    finally:
        model.lm_head.weight.copy_(head)
    assert grid.ids.max() < CODEBOOK and grid.preview.max() < CODEBOOK and grid.ids.min() >= 0


def test_source_ids_outside_this_codebook_are_refused(release):
    _, _, _, _, tok = release
    with pytest.raises(ValueError, match=r"source grid 0 has ids outside \[0, 1024\) \(the AR model's codebook\)"):
        build_ar_inputs(tok, ["a cat"], 128, 96, source_grids=[torch.tensor([[1024]])])


def test_inconsistent_configs_name_the_file_and_key(release, tmp_path):
    root = release[0]
    config = json.loads((root / "vision_language_encoder" / "config.json").read_text())
    assert read_ar_vocabulary(str(tmp_path / "ar.safetensors")) == ARVocabulary()  # no config: release defaults
    folder = tmp_path / "vision_language_encoder"
    folder.mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    for change, message in ((dict(image_start_token_id=5), "image_start_token_id 5 lies inside the codebook"),
                            (dict(vq_config={"num_embeddings": 4096}), "num_embeddings 4096 must be at most"),
                            (dict(image_end_token_id="1025"), "image_end_token_id must be a non-negative integer")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message) as error:
            read_ar_vocabulary(str(tmp_path))
        assert str(folder / "config.json") in str(error.value)
    # a tokenizer from the release with the real ids does not fit this config: said before anything runs
    (folder / "config.json").write_text(json.dumps(config))
    write_tiny_glm_image_tokenizer(str(tmp_path / "processor"))
    with pytest.raises(CheckpointError, match="different releases"):
        load_text_tokenizer(str(tmp_path))
