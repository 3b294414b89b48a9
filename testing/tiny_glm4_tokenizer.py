"""A tiny GLM-4-style tokenizer folder for tests and demos (no 151k-token vocabulary to download).

Same construction as the real GLM-4-9B ``tokenizer/`` folder: byte-level BPE behind GLM-4's split regex,
the GLM special tokens appended after the BPE vocabulary in the real order, ``<|endoftext|>`` as eos and
pad, and a post-processor that prefixes every text with ``[gMASK]<sop>``. Built with ``tokenizers`` only.
"""
from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>")
GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = (
    "a photo of a cat sitting on a wooden table next to a cup of coffee",
    "a painting of a mountain lake at sunrise, with mist over the water and pine trees",
    "a red sports car parked in front of a modern glass building at night",
    "a bowl of ramen with an egg, green onions and sesame seeds, studio lighting",
    "the words \"hello world\" written on a chalkboard in a classroom",
    "一只猫坐在窗台上，看着外面的雨",
)


def build_tiny_glm4_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[gMASK]", "<sop>")]),
    ])
    return tok


def write_tiny_glm4_tokenizer(folder: str) -> str:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    tok = build_tiny_glm4_tokenizer()
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 128000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return folder
