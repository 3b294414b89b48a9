"""AR prompt ids and M-RoPE positions against GlmImageProcessor.apply_chat_template + get_rope_index."""
import os

import pytest
import torch
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.runtime.geometry import target_grid
from glm_image_nodes.core.stages.ar_prompt import build_ar_inputs, load_text_tokenizer
from glm_image_nodes.testing.tiny_glm_image_tokenizer import write_tiny_glm_image_tokenizer
from PIL import Image
from tiny_glm_release import make_processor, rope_index_reference

PROMPT = 'A red fox reading a newspaper titled "DAILY 32", watercolor. Ünïcode ok?'


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_release")
    (root / "model_index.json").write_text("{}")
    processor = make_processor(str(root / "processor"))
    return root, processor, load_text_tokenizer(str(root))


def _reference(processor, prompts, height, width, images=None):
    messages = []
    for i, p in enumerate(prompts):
        content = [{"type": "image", "image": im} for im in (images[i] if images else [])]
        messages.append([{"role": "user", "content": content + [{"type": "text", "text": p}]}])
    return processor.apply_chat_template(messages, tokenize=True, padding=len(prompts) > 1, target_h=height,
                                         target_w=width, return_dict=True, return_tensors="pt")


def test_tokenizer_special_ids_and_paths(release, tmp_path):
    root, processor, tok = release
    assert (tok.image_start_id, tok.image_end_id, tok.image_token_id, tok.pad_id) == (16384, 16385, 167855, 167841)
    assert [tok.backend.token_to_id(t) for t in ("<sop>", "<eop>")] == [167845, 167846]
    for path in (root / "processor", root / "processor" / "tokenizer.json"):
        assert load_text_tokenizer(str(path)).encode(PROMPT) == tok.encode(PROMPT)
    assert tok.encode(PROMPT) == processor.tokenizer(PROMPT).input_ids
    assert max(tok.encode(PROMPT + "0123456789~`|")) < 167841  # plain text, any ASCII/UTF-8
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_text_tokenizer(str(tmp_path))


def test_tiny_tokenizer_writes_a_loadable_folder(tmp_path):
    write_tiny_glm_image_tokenizer(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert load_text_tokenizer(str(tmp_path)).encode("<sop>3 4<eop>")[::4] == [167845, 167846]


@pytest.mark.parametrize("height,width", [(1024, 1024), (1024, 1152), (1152, 768), (512, 2048), (1000, 700)])
def test_text_to_image_inputs_match_processor(release, height, width):
    _, processor, tok = release
    ref = _reference(processor, [PROMPT], height, width)
    mine = build_ar_inputs(tok, [PROMPT], height, width)
    assert torch.equal(mine.input_ids, ref["input_ids"])
    ref_pos, ref_decode = rope_index_reference(ref)
    assert torch.equal(mine.position_ids, ref_pos)
    assert torch.equal(mine.decode_position_ids, ref_decode)
    t = target_grid(height, width)
    assert ref["image_grid_thw"].tolist() == [[1, t.th, t.tw], [1, t.ph, t.pw]]
    assert mine.grids == [(t.ph, t.pw), (t.th, t.tw)]
    assert mine.decode_position_ids.shape[-1] == mine.num_new_tokens + 1


def test_padded_batch_matches_processor(release):
    _, processor, tok = release
    prompts = ["a cat", PROMPT]
    ref = _reference(processor, prompts, 1024, 1152)
    mine = build_ar_inputs(tok, prompts, 1024, 1152)
    assert mine.attention_mask[0, 0] == 0  # left padded
    assert torch.equal(mine.input_ids, ref["input_ids"])
    assert torch.equal(mine.attention_mask, ref["attention_mask"])
    ref_pos, ref_decode = rope_index_reference(ref)
    assert torch.equal(mine.position_ids, ref_pos)
    assert torch.equal(mine.decode_position_ids, ref_decode)


def test_image_to_image_inputs_match_processor_and_scatter(release):
    _, processor, tok = release
    images = [Image.new("RGB", (96, 64), (200, 10, 10)), Image.new("RGB", (64, 128), (10, 200, 10))]
    ref = _reference(processor, [PROMPT], 1024, 768, images=[images])
    assert ref["image_grid_thw"].tolist() == [[1, 2, 3], [1, 4, 2], [1, 32, 24]]
    sources = [torch.randint(0, 16384, (2, 3)), torch.randint(0, 16384, (4, 2))]
    # what GlmImageModel.forward does with the VQ ids: masked_scatter over the <|image|> placeholders
    ids = ref["input_ids"]
    ids = ids.masked_scatter(ids == tok.image_token_id, torch.cat([s.flatten() for s in sources]))
    mine = build_ar_inputs(tok, [PROMPT], 1024, 768, source_grids=sources)
    assert torch.equal(mine.input_ids, ids)
    ref_pos, ref_decode = rope_index_reference({**ref, "input_ids": ids})
    assert torch.equal(mine.position_ids, ref_pos)
    assert torch.equal(mine.decode_position_ids, ref_decode)
    assert mine.grids == [(32, 24)]


def test_size_errors(release):
    _, _, tok = release
    assert (target_grid(1000, 700).height, target_grid(1000, 700).width) == (992, 672)
    with pytest.raises(ValueError, match="at least 32"):
        target_grid(31, 1024)
    with pytest.raises(ValueError, match="preview grid"):
        build_ar_inputs(tok, ["x"], 32, 32 * 300)
    with pytest.raises(ValueError, match="outside"):
        build_ar_inputs(tok, ["x"], 64, 64, source_grids=[torch.full((2, 2), 16385)])
    with pytest.raises(ValueError, match="extra <\\|image\\|>"):
        build_ar_inputs(tok, ["x <|image|>"], 64, 64, source_grids=[torch.zeros(2, 2, dtype=torch.long)])
