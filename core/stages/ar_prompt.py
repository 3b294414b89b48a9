"""AR inputs for GLM-Image, exactly as ``GlmImageProcessor.apply_chat_template`` + ``get_rope_index`` build them.

Text-to-image: ``{prompt}<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>``; the model writes the
ph x pw preview grid, then the th x tw grid.
Image-to-image: ``<|dit_token_16384|>{source ids}<|dit_token_16385|>`` per source, then
``{prompt}<sop>{th} {tw}<eop><|dit_token_16384|>``; only the th x tw grid is written.

Positions (M-RoPE, [t, h, w]): text tokens share one running counter; a source grid at counter p gets
(p, p + row, p + col) and advances the counter by max(h, w). Generated grids are walked from the last grid
of the processor's list to the first (preview before the large grid in text-to-image) with the same rule.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, processors

from ..runtime.geometry import TargetGrid, target_grid
from ..runtime.loading import CheckpointError

IMAGE_START = "<|dit_token_16384|>"   # the processor's bos_token
IMAGE_END = "<|dit_token_16385|>"
IMAGE_TOKEN = "<|image|>"
GRID_BOS, GRID_EOS = "<sop>", "<eop>"
PAD = "<|endoftext|>"
CODEBOOK_SIZE = 16384


class TextTokenizer:
    """The GLM-Image text tokenizer (``processor/tokenizer.json``) with the ids the AR prompt needs."""

    def __init__(self, backend: Tokenizer, source: str):
        self.backend = backend
        self.source = source
        ids = {}
        for token in (IMAGE_START, IMAGE_END, IMAGE_TOKEN, GRID_BOS, GRID_EOS, PAD):
            ids[token] = backend.token_to_id(token)
            if ids[token] is None:
                raise CheckpointError(f"{source}: the tokenizer has no token {token}; it is not the GLM-Image "
                                      f"processor tokenizer.")
        self.image_start_id, self.image_end_id = ids[IMAGE_START], ids[IMAGE_END]
        self.image_token_id, self.pad_id = ids[IMAGE_TOKEN], ids[PAD]

    def encode(self, text: str) -> list[int]:
        # The processor's apply_chat_template adds the tokenizer's special tokens unless the text already
        # starts with its bos token (image-to-image prompts do).
        return self.backend.encode(text, add_special_tokens=not text.startswith(IMAGE_START)).ids


def _tokenizer_file(path: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        if path.endswith(".json"):
            return path
        path = os.path.dirname(os.path.abspath(path))  # a single safetensors file: tokenizer.json beside it
    candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "processor", "tokenizer.json"),
                  os.path.join(os.path.dirname(os.path.abspath(path)), "processor", "tokenizer.json")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise CheckpointError(f"No GLM-Image tokenizer found for {path}: expected processor/tokenizer.json in the "
                          f"release folder, or a tokenizer.json beside the weights.")


def _apply_tokenizer_config(backend: Tokenizer, folder: str) -> None:
    """Mirror transformers: an explicit add_bos_token/add_eos_token in tokenizer_config.json (or a missing
    post-processor) replaces the tokenizer.json post-processor with bos/eos templating."""
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    if backend.post_processor is not None and "add_bos_token" not in cfg and "add_eos_token" not in cfg:
        return

    def token(name):
        value = cfg.get(name)
        return value.get("content") if isinstance(value, dict) else value

    specials, single = [], "$A:0"
    bos, eos = token("bos_token"), token("eos_token")
    if cfg.get("add_bos_token") and bos:
        single, specials = f"{bos}:0 {single}", specials + [(bos, backend.token_to_id(bos))]
    if cfg.get("add_eos_token") and eos:
        single, specials = f"{single} {eos}:0", specials + [(eos, backend.token_to_id(eos))]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)


def load_text_tokenizer(path: str) -> TextTokenizer:
    """Load from a release root, its ``processor/`` folder, a ``tokenizer.json`` or a file beside one."""
    file = _tokenizer_file(path)
    try:
        backend = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise CheckpointError(f"{file} is not a valid tokenizers file ({e}); re-download it.") from e
    _apply_tokenizer_config(backend, os.path.dirname(file))
    return TextTokenizer(backend, file)


# ---- inputs ------------------------------------------------------------------------------------------------

@dataclass
class ARInputs:
    """input_ids / attention_mask [B,L] (left-padded), position_ids [3,B,L], decode_position_ids [3,B,N+1]
    (position of generated token k when fed back; the last one is the end marker's), grids: the (h, w) grids
    the model writes, in order."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    decode_position_ids: torch.Tensor
    grids: list[tuple[int, int]]
    target: TargetGrid

    @property
    def num_new_tokens(self) -> int:
        return sum(h * w for h, w in self.grids)


def _positions_for_sample(ids: list[int], grids: list[tuple[int, int]], start_id: int, end_id: int):
    """``get_rope_index`` for one unpadded sample: (positions [3,L], decode positions [3,N+1])."""
    ends = [i for i, t in enumerate(ids) if t == end_id]
    starts = [i + 1 for i, t in enumerate(ids) if t == start_id]
    parts, pos, prev_end = [], 0, 0
    for (start, end), (h, w) in zip(zip(starts, ends), grids):
        parts.append(torch.arange(pos, pos + start - prev_end).expand(3, -1))
        pos += start - prev_end
        parts.append(_grid_positions(pos, h, w))
        pos += max(h, w)
        prev_end = end
    parts.append(torch.arange(pos, pos + len(ids) - prev_end).expand(3, -1))
    pos += len(ids) - prev_end
    decode = []
    for h, w in reversed(grids[len(ends):]):
        decode.append(_grid_positions(pos, h, w))
        pos += max(h, w)
    decode.append(torch.full((3, 1), pos))
    return torch.cat(parts, dim=1), torch.cat(decode, dim=1)


def _grid_positions(base: int, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.full((h * w,), base), base + rows, base + cols])


def rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, grids: list[tuple[int, int]],
               image_start_id: int, image_end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill positions [3,B,L] (padding gets 1, as in the reference) and decode positions [3,B,N+1].

    ``grids``: every sample's (h, w) grids in the processor's order (sources, then the target grids).
    """
    b, n = input_ids.shape
    positions = torch.ones(3, b, n, dtype=torch.long)
    decodes = []
    for i in range(b):
        valid = attention_mask[i].bool()
        pos, dec = _positions_for_sample(input_ids[i][valid].tolist(), grids, image_start_id, image_end_id)
        positions[:, i, valid] = pos
        decodes.append(dec)
    return positions, torch.stack(decodes, dim=1)


def build_ar_inputs(tokenizer: TextTokenizer, prompts: list[str], height: int, width: int,
                    source_grids: list[torch.Tensor] | None = None) -> ARInputs:
    """Token ids, mask and M-RoPE positions for a batch of prompts (each with the same ``source_grids``)."""
    target = target_grid(height, width)
    sources = [torch.as_tensor(g, dtype=torch.long) for g in (source_grids or [])]
    for i, g in enumerate(sources):
        if g.ndim != 2 or g.numel() == 0:
            raise ValueError(f"source grid {i} must be a non-empty [h, w] tensor of token ids, got shape "
                             f"{tuple(g.shape)}.")
        if int(g.min()) < 0 or int(g.max()) >= CODEBOOK_SIZE:
            raise ValueError(f"source grid {i} has ids outside [0, {CODEBOOK_SIZE}).")
    if sources:
        suffix = f"{GRID_BOS}{target.th} {target.tw}{GRID_EOS}{IMAGE_START}"
        grids = [tuple(g.shape) for g in sources] + [(target.th, target.tw)]
    else:
        if target.ph == 0 or target.pw == 0:
            raise ValueError(f"Aspect ratio of {width}x{height} is too extreme: the preview grid would be "
                             f"{target.ph}x{target.pw}.")
        suffix = (f"{GRID_BOS}{target.th} {target.tw}{GRID_EOS}{GRID_BOS}{target.ph} {target.pw}{GRID_EOS}"
                  f"{IMAGE_START}")
        grids = [(target.th, target.tw), (target.ph, target.pw)]
    prefix = f"{IMAGE_START}{IMAGE_TOKEN}{IMAGE_END}" * len(sources)
    rows = [_expand_images(tokenizer, tokenizer.encode(prefix + p + suffix), sources) for p in prompts]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        input_ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, length - len(r):] = 1
    positions, decode = rope_index(input_ids, attention_mask, grids, tokenizer.image_start_id, tokenizer.image_end_id)
    generated = [(target.th, target.tw)] if sources else [(target.ph, target.pw), (target.th, target.tw)]
    return ARInputs(input_ids, attention_mask, positions, decode, generated, target)


def _expand_images(tokenizer: TextTokenizer, ids: list[int], sources: list[torch.Tensor]) -> list[int]:
    """Replace each ``<|image|>`` by its source grid's ids (the processor expands, the model scatters)."""
    slots = [i for i, t in enumerate(ids) if t == tokenizer.image_token_id]
    if len(slots) != len(sources):
        raise ValueError(f"The prompt has {len(slots) - len(sources)} extra {IMAGE_TOKEN} token(s); "
                         f"remove {IMAGE_TOKEN} from the prompt text.")
    out, prev = [], 0
    for slot, grid in zip(slots, sources):
        out += ids[prev:slot] + grid.flatten().tolist()
        prev = slot + 1
    return out + ids[prev:]
