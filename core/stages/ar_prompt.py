"""AR inputs for GLM-Image, exactly as ``GlmImageProcessor.apply_chat_template`` + ``get_rope_index`` build them.

Text-to-image: ``{prompt}<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>``; the model writes the
ph x pw preview grid, then the th x tw grid.
Image-to-image: ``<|dit_token_16384|>{source ids}<|dit_token_16385|>`` per source, then
``{prompt}<sop>{th} {tw}<eop><|dit_token_16384|>``; only the th x tw grid is written.

Positions (M-RoPE, [t, h, w]): text tokens share one running counter; a source grid at counter p gets
(p, p + row, p + col) and advances the counter by max(h, w). Generated grids are walked from the last grid
of the processor's list to the first (preview before the large grid in text-to-image) with the same rule.

The markers and the codebook size are the release's (``ARVocabulary``, read from the AR config.json): the
start and end markers are the tokens at ``image_start_token_id`` and ``image_end_token_id`` (16384 and 16385
in zai-org/GLM-Image), the codebook ``vq_config.num_embeddings``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, processors

from ..formats.reading import CheckpointError, read_json
from ..runtime.geometry import TargetGrid, target_grid

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image|>"            # defaults of the processor's tokenizer_config.json special tokens
GRID_BOS, GRID_EOS = "<sop>", "<eop>"
PAD = "<|endoftext|>"
AR_COMPONENT = "vision_language_encoder"


@dataclass(frozen=True)
class ARVocabulary:
    """The ids the AR prompt and sampler use, from the release's ``vision_language_encoder/config.json``
    (defaults: zai-org/GLM-Image's). Codebook ids are ``0..codebook_size-1``; the lm_head scores
    ``vision_vocab_size`` ids, the rest of which (image start/end and reserved ids) are never sampled."""
    image_start_id: int = 16384
    image_end_id: int = 16385
    image_token_id: int = 167855
    codebook_size: int = 16384
    vision_vocab_size: int = 16512
    source: str = "the GLM-Image release defaults"

    def check(self) -> "ARVocabulary":
        if not 0 < self.codebook_size <= self.vision_vocab_size:
            raise CheckpointError(f"{self.source}: vq_config.num_embeddings {self.codebook_size} must be at most "
                                  f"text_config.vision_vocab_size {self.vision_vocab_size}. Use the release's own "
                                  f"config.json.")
        for key, value in (("image_start_token_id", self.image_start_id), ("image_end_token_id", self.image_end_id)):
            if value < self.codebook_size:
                raise CheckpointError(f"{self.source}: {key} {value} lies inside the codebook "
                                      f"(vq_config.num_embeddings {self.codebook_size}); the config is not a "
                                      f"GLM-Image one. Use the release's own config.json.")
        return self


def _ar_config_file(path: str) -> str | None:
    """The AR config.json for a release root, its AR or processor folder, or a file beside one."""
    path = os.path.abspath(os.path.expanduser(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for candidate in (os.path.join(folder, AR_COMPONENT, "config.json"), os.path.join(folder, "config.json"),
                      os.path.join(os.path.dirname(folder), AR_COMPONENT, "config.json")):
        if os.path.isfile(candidate) and "text_config" in read_json(candidate):
            return candidate
    return None


def read_ar_vocabulary(path: str) -> ARVocabulary:
    """Special-token ids, codebook size and vision vocabulary of the release at ``path`` (see ``_ar_config_file``);
    the release defaults when there is no AR config (a single file without its config.json)."""
    file = _ar_config_file(path)
    if file is None:
        log.info("No GLM-Image AR config.json found for %s; using the release's special-token ids.", path)
        return ARVocabulary()
    config = read_json(file)
    default = ARVocabulary()
    keys = {"image_start_id": ("image_start_token_id",), "image_end_id": ("image_end_token_id",),
            "image_token_id": ("image_token_id",), "codebook_size": ("vq_config", "num_embeddings"),
            "vision_vocab_size": ("text_config", "vision_vocab_size")}
    values = {}
    for field, key in keys.items():
        section = config.get(key[0], {}) if len(key) == 2 else config
        value = section.get(key[-1], getattr(default, field)) if isinstance(section, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {'.'.join(key)} must be a non-negative integer, got {value!r}. Use the "
                                  f"release's own config.json.")
        values[field] = value
    return ARVocabulary(**values, source=file).check()


class TextTokenizer:
    """The GLM-Image text tokenizer (``processor/tokenizer.json``) with the tokens the AR prompt needs: the image
    start/end markers are the tokens at the config's ids, the image and grid tokens those the processor's
    ``tokenizer_config.json`` names."""

    def __init__(self, backend: Tokenizer, source: str, vocabulary: ARVocabulary | None = None,
                 names: dict | None = None):
        self.backend = backend
        self.source = source
        self.vocabulary = vocabulary = vocabulary or ARVocabulary()
        names = names or {}
        self.image_start = backend.id_to_token(vocabulary.image_start_id)
        self.image_end = backend.id_to_token(vocabulary.image_end_id)
        for name, token, key in (("image start", self.image_start, "image_start_token_id"),
                                 ("image end", self.image_end, "image_end_token_id")):
            if token is None:
                raise CheckpointError(f"{source}: the tokenizer has no token with the {name} id "
                                      f"{getattr(vocabulary, key.replace('_token_id', '_id'))} ({key} of "
                                      f"{vocabulary.source}); the tokenizer and the AR config are from different "
                                      f"releases.")
        self.image_token = names.get("image_token") or IMAGE_TOKEN
        self.grid_bos = names.get("grid_bos_token") or GRID_BOS
        self.grid_eos = names.get("grid_eos_token") or GRID_EOS
        ids = {}
        for token in (self.image_token, self.grid_bos, self.grid_eos, names.get("pad_token") or PAD):
            ids[token] = backend.token_to_id(token)
            if ids[token] is None:
                raise CheckpointError(f"{source}: the tokenizer has no token {token}; it is not the GLM-Image "
                                      f"processor tokenizer.")
        self.image_start_id, self.image_end_id = vocabulary.image_start_id, vocabulary.image_end_id
        self.image_token_id, self.pad_id = ids[self.image_token], ids[names.get("pad_token") or PAD]
        if self.image_token_id != vocabulary.image_token_id:
            raise CheckpointError(f"{source}: the image token {self.image_token} has id {self.image_token_id} but "
                                  f"{vocabulary.source} says image_token_id {vocabulary.image_token_id}; the "
                                  f"processor and the AR model are from different releases.")

    @property
    def codebook_size(self) -> int:
        return self.vocabulary.codebook_size

    def encode(self, text: str) -> list[int]:
        # The processor's apply_chat_template adds the tokenizer's special tokens unless the text already
        # starts with its bos token (image-to-image prompts do).
        return self.backend.encode(text, add_special_tokens=not text.startswith(self.image_start)).ids


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


def _read_tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    return read_json(path) if os.path.isfile(path) else {}


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_names(cfg: dict) -> dict:
    """The processor's special-token attributes (``extra_special_tokens``) and the pad token."""
    extra = cfg.get("extra_special_tokens") or {}
    names = {k: _token_content(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
    return {**names, "pad_token": _token_content(cfg.get("pad_token"))}


def _apply_tokenizer_config(backend: Tokenizer, cfg: dict) -> None:
    """Mirror transformers: an explicit add_bos_token/add_eos_token in tokenizer_config.json (or a missing
    post-processor) replaces the tokenizer.json post-processor with bos/eos templating."""
    if backend.post_processor is not None and "add_bos_token" not in cfg and "add_eos_token" not in cfg:
        return
    specials, single = [], "$A:0"
    bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
    if cfg.get("add_bos_token") and bos:
        single, specials = f"{bos}:0 {single}", specials + [(bos, backend.token_to_id(bos))]
    if cfg.get("add_eos_token") and eos:
        single, specials = f"{single} {eos}:0", specials + [(eos, backend.token_to_id(eos))]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)


def load_text_tokenizer(path: str, vocabulary: ARVocabulary | None = None) -> TextTokenizer:
    """Load from a release root, its ``processor/`` folder, a ``tokenizer.json`` or a file beside one.
    ``vocabulary``: the AR config's ids; read from the release at ``path`` when not given."""
    file = _tokenizer_file(path)
    try:
        backend = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise CheckpointError(f"{file} is not a valid tokenizers file ({e}); re-download it.") from e
    cfg = _read_tokenizer_config(os.path.dirname(file))
    _apply_tokenizer_config(backend, cfg)
    return TextTokenizer(backend, file, vocabulary or read_ar_vocabulary(path), _special_names(cfg))


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
    codebook = tokenizer.codebook_size
    sources = [torch.as_tensor(g, dtype=torch.long) for g in (source_grids or [])]
    for i, g in enumerate(sources):
        if g.ndim != 2 or g.numel() == 0:
            raise ValueError(f"source grid {i} must be a non-empty [h, w] tensor of token ids, got shape "
                             f"{tuple(g.shape)}.")
        if int(g.min()) < 0 or int(g.max()) >= codebook:
            raise ValueError(f"source grid {i} has ids outside [0, {codebook}) (the AR model's codebook): the "
                             f"references were tokenized for another model.")
    grid_size = f"{tokenizer.grid_bos}{target.th} {target.tw}{tokenizer.grid_eos}"
    if sources:
        suffix = f"{grid_size}{tokenizer.image_start}"
        grids = [tuple(g.shape) for g in sources] + [(target.th, target.tw)]
    else:
        if target.ph == 0 or target.pw == 0:
            raise ValueError(f"Aspect ratio of {width}x{height} is too extreme: the preview grid would be "
                             f"{target.ph}x{target.pw}.")
        suffix = f"{grid_size}{tokenizer.grid_bos}{target.ph} {target.pw}{tokenizer.grid_eos}{tokenizer.image_start}"
        grids = [(target.th, target.tw), (target.ph, target.pw)]
    prefix = f"{tokenizer.image_start}{tokenizer.image_token}{tokenizer.image_end}" * len(sources)
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
    """Replace each image token by its source grid's ids (the processor expands, the model scatters)."""
    slots = [i for i, t in enumerate(ids) if t == tokenizer.image_token_id]
    if len(slots) != len(sources):
        raise ValueError(f"The prompt has {len(slots) - len(sources)} extra {tokenizer.image_token} token(s); "
                         f"remove {tokenizer.image_token} from the prompt text.")
    out, prev = [], 0
    for slot, grid in zip(slots, sources):
        out += ids[prev:slot] + grid.flatten().tolist()
        prev = slot + 1
    return out + ids[prev:]
