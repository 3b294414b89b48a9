"""The prompt helper on a tiny random GLM-V: the chat it builds and the tokens it decodes are exactly those of
transformers (``Glm4vProcessor.apply_chat_template`` + ``generate``) for the same messages."""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from glm_image_nodes.core.models.captioner import (  # noqa: E402
    chat_text_inputs,
    generate_reply_ids,
    load_captioner,
    strip_reasoning,
)
from glm_image_nodes.core.stages import handles  # noqa: E402
from glm_image_nodes.core.stages.prompt_enhance import (  # noqa: E402
    SYSTEM_PROMPTS,
    USER_PREFIX,
    enhance_messages,
    enhance_prompt,
    prompt_language,
)
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_glmv import reference_processor, write_tiny_glmv  # noqa: E402

PROMPT = 'a bakery window with a sign that says "Fresh Bread"'
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return load_captioner(write_tiny_glmv(str(tmp_path_factory.mktemp("glmv"))), dtype="fp32", device="cpu")


@pytest.fixture()
def processor(captioner, monkeypatch):
    return reference_processor(captioner, monkeypatch)


def reference(captioner, processor, messages):
    """transformers' own path: the processor's chat template, then greedy ``generate``."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.inference_mode():
        out = captioner.model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    return inputs, out[0, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("prompt", [PROMPT, "一张海报，上面写着“开业大吉”"])
def test_chat_and_greedy_decoding_match_transformers(captioner, processor, prompt):
    messages = enhance_messages(prompt)
    ref_inputs, ref_ids = reference(captioner, processor, messages)
    ours = chat_text_inputs(captioner, messages)
    assert torch.equal(ours["input_ids"], ref_inputs["input_ids"])
    assert torch.equal(ours["attention_mask"], ref_inputs["attention_mask"])
    ids = generate_reply_ids(captioner, ours, NEW_TOKENS, temperature=0.0)
    assert torch.equal(ids, ref_ids), (ids.tolist(), ref_ids.tolist())
    expected = strip_reasoning(processor.decode(ref_ids, skip_special_tokens=False))
    assert expected, "the tiny model's reply is empty; pick another prompt"
    assert enhance_prompt(captioner, prompt, max_new_tokens=NEW_TOKENS) == expected


def test_temperature_zero_is_deterministic_and_sampling_follows_the_seed(captioner):
    greedy = [enhance_prompt(captioner, PROMPT, max_new_tokens=NEW_TOKENS, seed=s) for s in (0, 1)]
    assert greedy[0] == greedy[1]  # the seed plays no part at temperature 0
    sampled = [enhance_prompt(captioner, PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_language_picks_the_system_prompt_and_user_prefix():
    assert prompt_language(PROMPT) == "en"
    assert prompt_language("一只戴着帽子的猫，上面写着“Hello”") == "zh"   # 12 CJK characters, 1 Latin word
    assert prompt_language("a cat 猫") == "en"                         # 1 CJK character, 2 words
    for prompt, language in ((PROMPT, "en"), ("一只猫", "zh")):
        system, user = enhance_messages(prompt)
        assert system == {"role": "system", "content": SYSTEM_PROMPTS[language]}
        assert user == {"role": "user", "content": USER_PREFIX[language] + prompt}
    assert enhance_messages(PROMPT, "zh")[0]["content"] == SYSTEM_PROMPTS["zh"]
    # the guidance the official utility insists on
    assert "double quotes" in SYSTEM_PROMPTS["en"] and "双引号" in SYSTEM_PROMPTS["zh"]


def test_bad_input_is_refused_before_generating():
    with pytest.raises(ValueError, match="prompt to enhance is empty"):
        enhance_messages("   ")
    with pytest.raises(ValueError, match="language must be one of auto, en, zh"):
        enhance_messages(PROMPT, "fr")


def test_node_returns_the_rewrite(captioner):
    node = NODE_CLASS_MAPPINGS["GLMImagePromptEnhance"]()
    (text,) = node.enhance(handles.ModelHandle(captioner), PROMPT, "auto", NEW_TOKENS, 0.0, 0)
    assert text == enhance_prompt(captioner, PROMPT, max_new_tokens=NEW_TOKENS)


def test_the_node_builds_the_chat_on_the_placed_device_not_where_the_weights_are(captioner, monkeypatch):
    """The node passes the device ``on_compute_device`` yields (``cpu:0`` here: a device other than the weights'
    ``cpu`` that still works on this machine) while the captioner's weights claim to be elsewhere."""
    from glm_image_nodes.core.host import memory
    from glm_image_nodes.core.models.captioner import Captioner
    from glm_image_nodes.core.stages import prompt_enhance

    compute = torch.device("cpu", 0)
    monkeypatch.setattr(memory, "get_device", lambda: compute)
    monkeypatch.setattr(Captioner, "device", property(lambda self: torch.device("cuda")))
    seen, real = [], prompt_enhance.chat_text_inputs
    monkeypatch.setattr(prompt_enhance, "chat_text_inputs",
                        lambda c, messages, device=None: seen.append(device) or real(c, messages, device))
    node = NODE_CLASS_MAPPINGS["GLMImagePromptEnhance"]()
    (text,) = node.enhance(handles.ModelHandle(captioner), PROMPT, "auto", NEW_TOKENS, 0.0, 0)
    assert seen == [compute]
    assert text == enhance_prompt(captioner, PROMPT, max_new_tokens=NEW_TOKENS, device=torch.device("cpu"))
