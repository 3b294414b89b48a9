"""A small GLM-Image-compatible text tokenizer for tests and the tiny demo release.

Same id layout as the real one: ids 0..16511 are the ``<|dit_token_k|>`` tokens, GLM-4 text ids are shifted
by +16512, and the special tokens keep their real ids (``<|endoftext|>`` 167841, ``<sop>`` 167845,
``<eop>`` 167846, ``<|image|>`` 167855); ``vision_vocab`` and ``codebook_size`` make the layout of a release
with other ids (everything shifted by the vision vocabulary, the image markers at the codebook size). The text
vocabulary is byte-level BPE over the 256 byte symbols
(GLM ids 0..255, so ids 16512..16767) plus a few merges, enough for any prompt. Ids between the last merge
and 167841 are unused, so a tiny model still needs ``vocab_size`` > 167855 (the real 168064 is used).

Written with the ``tokenizers`` library only; loads with ``core.stages.ar_prompt.load_text_tokenizer`` and with
transformers' ``PreTrainedTokenizerFast`` / ``GlmImageProcessor`` (``tokenizer_config.json`` names the
processor's special-token attributes).
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

VISION_VOCAB = 16512
CODEBOOK_SIZE = 16384
TEXT_OFFSET = VISION_VOCAB
# GLM-4 special tokens from id 151329 on (+16512 gives the GLM-Image ids).
GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                "<|begin_of_video|>", "<|end_of_video|>", "<|image|>"]
GLM_SPECIAL_START = 151329
TINY_VOCAB_SIZE = 168064
MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("o", "n"), ("e", "r"), ("Ġ", "c"),
          ("a", "t"), ("Ġc", "at"), ("Ġ", "1"), ("Ġ", "2"), ("Ġ", "3")]


def chat_template(codebook_size: int = CODEBOOK_SIZE) -> str:
    """The processor's chat template; an image item is wrapped in the image start/end markers (the tokens at
    ids codebook_size and codebook_size + 1)."""
    return (
        "{%- for m in messages -%}"
        "{%- if m.content is string -%}{{ m.content }}"
        "{%- else -%}{%- for item in m.content -%}"
        f"{{%- if item.type == 'image' -%}}<|dit_token_{codebook_size}|><|image|><|dit_token_{codebook_size + 1}|>"
        "{%- elif item.type == 'text' -%}{{ item.text }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
    )


CHAT_TEMPLATE = chat_template()


def special_id(token: str, vision_vocab: int = VISION_VOCAB) -> int:
    """The id of a GLM-4 special token (``<|image|>``, ``<|endoftext|>``...) for a vision vocabulary size."""
    return vision_vocab + GLM_SPECIAL_START + GLM_SPECIALS.index(token)


def _vocab(vision_vocab: int) -> dict[str, int]:
    vocab = {f"<|dit_token_{k}|>": k for k in range(vision_vocab)}
    byte_symbols = ByteLevel.alphabet()
    text = sorted(byte_symbols) + [a + b for a, b in MERGES]
    vocab.update({tok: vision_vocab + i for i, tok in enumerate(text)})
    vocab.update({tok: special_id(tok, vision_vocab) for tok in GLM_SPECIALS})
    return vocab


def build_tiny_tokenizer(vision_vocab: int = VISION_VOCAB) -> Tokenizer:
    bpe = models.BPE(vocab=_vocab(vision_vocab), merges=MERGES, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [f"<|dit_token_{k}|>" for k in range(vision_vocab)] + GLM_SPECIALS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def write_tiny_glm_image_tokenizer(folder: str, vision_vocab: int = VISION_VOCAB,
                                   codebook_size: int = CODEBOOK_SIZE) -> str:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``folder``.

    ``vision_vocab`` and ``codebook_size`` (16512 and 16384 in the release) set the id layout: the image start
    marker (the processor's bos token) is ``<|dit_token_{codebook_size}|>``."""
    os.makedirs(folder, exist_ok=True)
    build_tiny_tokenizer(vision_vocab).save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": f"<|dit_token_{codebook_size}|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "extra_special_tokens": {"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template(codebook_size))
    return folder
