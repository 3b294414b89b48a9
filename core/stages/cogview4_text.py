"""CogView4-6B prompt encoding: GLM-4 tokenizer -> left pad to a multiple of 16 -> GLM hidden_states[-2].

Reproduces ``CogView4Pipeline._get_glm_embeds`` (diffusers) without transformers: the release's
``tokenizer/`` folder is read with the ``tokenizers`` library and set up the way ``PreTrainedTokenizerFast``
sets it up, so the ids are the same (GLM-4 prefixes every text with ``[gMASK]<sop>`` via its post-processor).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, processors

from ..formats.layers import compute_dtype
from ..formats.reading import CheckpointError, component_path
from ..host.interrupts import check_interrupt
from ..models.glm_text_encoder import GlmTextEncoder
from ..runtime.checks import check_finite_output, check_text
from ..runtime.devices import compute_device

log = logging.getLogger(__name__)

MAX_TOKENS = 1024
PAD_MULTIPLE = 16
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class CogView4Tokenizer:
    tokenizer: Tokenizer
    pad_token_id: int
    truncation_side: str = "right"

    def encode(self, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """Ids with the special prefix, cut to ``max_tokens`` (with a warning when anything is dropped)."""
        self.tokenizer.enable_truncation(max_tokens, stride=0, strategy="longest_first", direction=self.truncation_side)
        try:
            encoding = self.tokenizer.encode(prompt, add_special_tokens=True)
        finally:
            self.tokenizer.no_truncation()
        if encoding.overflowing:
            dropped = "".join(self.tokenizer.decode(o.ids, skip_special_tokens=True) for o in encoding.overflowing)
            shown = dropped if len(dropped) <= 300 else dropped[:300] + "..."
            log.warning("CogView4 prompt is longer than %d tokens (the text encoder's limit); it was cut on the %s "
                        "and this part (%d characters) is ignored: %r", max_tokens, self.truncation_side,
                        len(dropped), shown)
        return encoding.ids


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_cogview4_tokenizer(path: str) -> CogView4Tokenizer:
    """Load the GLM-4 tokenizer from a release root, its ``tokenizer/`` folder or a ``tokenizer.json`` file
    (then ``tokenizer_config.json`` is read from beside it, if there)."""
    path = component_path(path, "tokenizer")
    if os.path.isdir(path):
        folder, file = path, os.path.join(path, "tokenizer.json")
    else:
        folder, file = os.path.dirname(path), path
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no tokenizer.json found. Download the tokenizer/ folder of THUDM/CogView4-6B "
                              f"(tokenizer.json and tokenizer_config.json).")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:
        raise CheckpointError(f"{file} could not be read as a tokenizers file ({e}); re-download it.") from e
    config_file = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)

    # As PreTrainedTokenizerFast: no truncation/padding from the file, special tokens of the config added
    # as special, and a bos/eos template instead of the file's post-processor when the config asks for it.
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    wanted = [_token_content(v) for v in config.get("added_tokens_decoder", {}).values()]
    wanted += [_token_content(config.get(k)) for k in NAMED_SPECIAL]
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    wanted += [_token_content(v) for v in (extras.values() if isinstance(extras, dict) else extras)]
    missing = list(dict.fromkeys(t for t in wanted if t and t not in present))
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if "add_bos_token" in config or "add_eos_token" in config or tok.post_processor is None:
        tok.post_processor = _bos_eos_template(tok, config)

    pad = _token_content(config.get("pad_token")) or (tok.padding or {}).get("pad_token")
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
        raise CheckpointError(f"{folder}: the tokenizer has no pad token (tokenizer_config.json pad_token), which "
                              f"CogView4 pads prompts with. Use the tokenizer/ folder of THUDM/CogView4-6B.")
    return CogView4Tokenizer(tok, pad_id, config.get("truncation_side", "right"))


def _bos_eos_template(tok: Tokenizer, config: dict) -> processors.TemplateProcessing:
    bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def cogview4_prompt_ids(tokenizer: CogView4Tokenizer, prompt: str, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """[1, L] ids as CogView4 feeds them: tokenized, truncated, then left-padded to a multiple of 16."""
    ids = tokenizer.encode(prompt, max_tokens)
    pad = (-len(ids)) % PAD_MULTIPLE
    return torch.tensor([[tokenizer.pad_token_id] * pad + ids], dtype=torch.long)


@torch.inference_mode()
def encode_cogview4_prompt(encoder: GlmTextEncoder, tokenizer: CogView4Tokenizer, prompt: str,
                           max_tokens: int = MAX_TOKENS, name: str = "prompt",
                           device: torch.device | None = None) -> torch.Tensor:
    """Prompt -> CogView4 text conditioning [1, L, hidden] (float32), computed on and left on ``device`` (the
    compute device; None: where the weights are). No attention mask: the pads are attended, as in the
    reference pipeline."""
    check_text(prompt, name)
    embed = encoder.embed_tokens
    ids = cogview4_prompt_ids(tokenizer, prompt, max_tokens).to(compute_device(device, embed.weight.device))
    hidden = encoder(ids, check_interrupt)
    return check_finite_output(hidden, "The CogView4 text encoder (GLM-4)", compute_dtype(embed)).float()
