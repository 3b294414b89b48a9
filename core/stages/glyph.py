"""The glyph path of GLM-Image: quoted prompt text -> ByT5 bytes -> T5 encoder -> one embedding sequence.

Follows diffusers ``GlmImagePipeline.get_glyph_texts`` / ``_get_glyph_embeds`` including their quirks:
texts are grouped by quote type, every text gets a leading pad when the *number* of texts is even,
and the valid positions of all texts are concatenated into a single sequence.
"""
from __future__ import annotations

import logging
import re

import torch

from ..models.t5_encoder import T5Encoder
from ..runtime.checks import check_finite_output, check_text
from ..runtime.devices import compute_device
from .handles import GlyphConditioning

log = logging.getLogger(__name__)

# the pipeline's regexes, in its order: texts are grouped by quote type, not by position
QUOTE_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")

# ByT5Tokenizer: pad 0, eos 1, unk 2, byte b -> b + 3, then 125 sentinels <extra_id_i> -> 259 + i
PAD, EOS = 0, 1
BYTE_OFFSET = 3
MAX_LENGTH = 2048
MAX_PADDED_TOKENS = 8 * MAX_LENGTH  # texts x longest text: what the encoder runs at once
SPECIAL_IDS = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"<extra_id_{i}>": 259 + i for i in range(125)}}
STRIPPING = {"<pad>", "</s>", "<unk>"}  # added with lstrip/rstrip: whitespace next to them is dropped
SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in sorted(SPECIAL_IDS, key=len, reverse=True)) + ")")


def extract_glyph_texts(prompt: str) -> list[str]:
    """The quoted spans of ``prompt`` ('...', “...”, "...", 「...」, grouped in that order), or ``[""]``."""
    return [text for pattern in QUOTE_PATTERNS for text in re.findall(pattern, prompt)] or [""]


def byt5_ids(text: str, max_length: int = MAX_LENGTH) -> list[int]:
    """``ByT5Tokenizer(text, max_length=max_length, truncation=True).input_ids``."""
    parts = SPECIAL_SPLIT.split(text)  # odd positions hold special tokens
    for i in range(1, len(parts), 2):
        if parts[i] in STRIPPING:
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
    ids = []
    for i, part in enumerate(parts):
        ids.extend([SPECIAL_IDS[part]] if i % 2 else [b + BYTE_OFFSET for b in part.encode("utf-8")])
    if len(ids) >= max_length:
        log.warning("Glyph text of %d bytes truncated to %d ByT5 tokens, as the reference does: %.60r...",
                    len(ids), max_length - 1, text)
    ids = ids[:max_length - 1]
    return ids if ids and ids[-1] == EOS else ids + [EOS]  # no second EOS after a literal "</s>"


def tokenize_glyph_texts(texts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask ``[N, S]`` as the pipeline builds them (leading pad when N is even)."""
    for i, text in enumerate(texts):
        check_text(text, f"glyph text {i + 1}")
    lead = [PAD] * ((len(texts) + 1) % 2)
    seqs = [lead + byt5_ids(t, max_length) for t in texts]
    longest = max(len(s) for s in seqs)
    if len(seqs) * longest > MAX_PADDED_TOKENS:
        raise ValueError(f"The text to render makes {len(seqs)} glyph texts of up to {longest} ByT5 tokens "
                         f"({len(seqs) * longest} padded), over the {MAX_PADDED_TOKENS} the glyph encoder takes at "
                         f"once: quote less text in the prompt, or list only the texts to render in `texts`.")
    ids = torch.tensor([s + [PAD] * (longest - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask


@torch.inference_mode()
def encode_glyph_texts(encoder: T5Encoder, texts: list[str], device: torch.device | None = None) -> torch.Tensor:
    """float32 ``[1, L, D]``: the valid positions of every text's encoding, concatenated, computed on ``device``
    (the compute device; None: where the weights are) and left there."""
    if not texts:
        raise ValueError("encode_glyph_texts needs at least one text; the pipeline encodes [\"\"] when there is none.")
    device = compute_device(device, encoder.shared.weight.device)
    ids, mask = tokenize_glyph_texts(texts)
    ids, mask = ids.to(device), mask.to(device)
    hidden = check_finite_output(encoder(ids, mask), "The glyph encoder (Glyph-ByT5)", encoder.shared.weight.dtype)
    return hidden[mask.bool()].unsqueeze(0).float()


def glyph_texts(prompt: str, texts: list[str] | None = None) -> list[str]:
    """What is encoded: ``texts`` when given, else the prompt's quoted spans; checked (valid text, and few
    enough tokens for one encoder pass) before any model runs."""
    check_text(prompt, "prompt")
    texts = list(texts) if texts else extract_glyph_texts(prompt)
    tokenize_glyph_texts(texts)
    return texts


def check_glyph_width(glyph: GlyphConditioning, width: int) -> None:
    """Glyph embeddings must be as wide as the decoder's glyph projector takes (another encoder's would fail deep
    in a matmul)."""
    got = {tuple(t.shape)[-1:] for t in (glyph.cond, glyph.uncond)}
    if got != {(width,)}:
        shapes = f"{tuple(glyph.cond.shape)} / {tuple(glyph.uncond.shape)}"
        raise ValueError(f"The glyph embeddings (cond / uncond {shapes}) are not {width} wide, the width this "
                         f"decoder's glyph projector takes: they come from another text encoder. Connect the Glyph "
                         f"Conditioning of the Glyph-ByT5 loaded from this decoder's release.")


def glyph_conditioning(encoder: T5Encoder, prompt: str, texts: list[str] | None = None, *,
                       device: torch.device | None = None) -> GlyphConditioning:
    """Glyph embeddings of the prompt's quoted text (or of ``texts`` when given) and of ``""``, float32 on CPU,
    computed on ``device`` (None: where the weights are)."""
    texts = glyph_texts(prompt, texts)
    return GlyphConditioning(cond=encode_glyph_texts(encoder, texts, device).cpu(),
                             uncond=encode_glyph_texts(encoder, [""], device).cpu(), texts=texts)
