"""A tiny random GLM-V (``Glm4vForConditionalGeneration``) release folder for tests.

``write_tiny_glmv(folder)`` saves config + safetensors, a byte-level BPE tokenizer with the GLM-4V
special tokens, a GLM-4.1V-style ``chat_template.jinja`` and the image processor, laid out like the
``zai-org/GLM-4.1V-9B-Thinking`` release. No ``Glm4vProcessor`` files: that class needs torchvision
(for its video processor), which the test environment lacks. Images are tiny: 56x56 pixels are
4x4 patches of 14, merged 2x2 into 4 image tokens.
"""
from __future__ import annotations

import os

import torch

IMAGE_SIZE = 56

SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
]
# Kept in decoded text (not special), as in the GLM-4.1V-Thinking tokenizer.
MARKUP_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"]

# The GLM-4.1V-9B-Thinking template, reduced to what the tests need (system, user text/image/video, assistant).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>{{ '\\n' }}{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>{{ '\\n' }}{{ msg.content }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def tiny_config(tokenizer):
    from transformers import Glm4vConfig

    ids = tokenizer.convert_tokens_to_ids
    eos = [ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")]
    return Glm4vConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            # head_dim 16, half of it rotated: 4 frequencies split t/h/w as in mrope_section
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 1, 1]},
            pad_token_id=ids("<|endoftext|>"), eos_token_id=eos,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=32,  # = text hidden
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=28,
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
        ),
        image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"),
    )


def write_tiny_glmv(folder: str, seed: int = 0) -> str:
    """Write a tiny random GLM-V release into ``folder`` and return it."""
    from transformers import Glm4vForConditionalGeneration, Glm4vImageProcessorPil

    os.makedirs(folder, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(tiny_config(tokenizer)).eval()
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE  # saved as chat_template.jinja
    tokenizer.save_pretrained(folder)
    # Saved as "Glm4vImageProcessor" (the release's name); loads as the PIL one when torchvision is absent.
    # The pixel limits count the 2 temporal frames: a 56x56 image stays 56x56 (4x4 patches, 4 tokens).
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 2 * 28 * 28,
                                                   "longest_edge": 2 * IMAGE_SIZE * IMAGE_SIZE})
    image_processor.save_pretrained(folder)
    return folder


def reference_processor(captioner, monkeypatch):
    """transformers' ``Glm4vProcessor`` over the captioner's tokenizer, image processor and chat template.
    It insists on a torchvision video processor, which images and text never touch: the check is patched out."""
    from transformers import Glm4vProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    return Glm4vProcessor(image_processor=captioner.image_processor, tokenizer=captioner.tokenizer,
                          video_processor=None, chat_template=captioner.chat_template)
