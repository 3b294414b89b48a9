"""The key prefixes ComfyUI's savers put in front of a model's own state-dict keys, found and taken off.

ComfyUI 0.3.64 ``comfy/supported_models_base.py`` saves a checkpoint's diffusion model under
``model.diffusion_model.`` (``process_unet_state_dict_for_saving``), its VAE under ``first_stage_model.`` and its
text encoders under ``cond_stage_model.`` or, for newer models, ``text_encoders.`` (``text_encoder_key_prefix``),
each encoder's keys under ``<name>.transformer.`` (``comfy/sd.py`` ``CLIP.get_sd``). Tools that re-save the bare
diffusion model (ComfyUI-GGUF's ``convert.py`` input, several merge tools) leave ``diffusion_model.``.

A file whose keys all carry one such prefix is read as if they did not; an all-in-one checkpoint (several
prefixes) gives each loader the part of its role. Folders with an index (the release's own layout) are never
prefixed and are left as they are.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter

from .checkpoint import Checkpoint

DIFFUSION, VAE, TEXT = "diffusion model", "VAE", "text encoder"
# (pattern, role); a key's prefix is the longest match
PATTERNS = (
    (re.compile(r"model\.diffusion_model\."), DIFFUSION),
    (re.compile(r"diffusion_model\."), DIFFUSION),
    (re.compile(r"first_stage_model\."), VAE),
    (re.compile(r"text_encoders\.[A-Za-z0-9_]+\.transformer\."), TEXT),
    (re.compile(r"text_encoders\.[A-Za-z0-9_]+\."), TEXT),
    (re.compile(r"cond_stage_model\.(?:[A-Za-z0-9_]+\.)?transformer\."), TEXT),
    (re.compile(r"cond_stage_model\."), TEXT),
)
ROLE_OF_SUBFOLDER = {"transformer": DIFFUSION, "vae": VAE}  # any other component is a text encoder


def prefix_of(key: str) -> tuple[str, str] | None:
    """(the ComfyUI prefix of ``key``, its role), or None."""
    best = None
    for pattern, role in PATTERNS:
        match = pattern.match(key)
        if match and (best is None or len(match.group(0)) > len(best[0])):
            best = (match.group(0), role)
    return best


def prefix_groups(keys) -> Counter:
    """``{(prefix, role): number of keys}``; keys without a ComfyUI prefix count under ``("", "")``."""
    return Counter(prefix_of(k) or ("", "") for k in keys)


def choose_prefix(keys, role: str) -> str | None:
    """The prefix to take off for a loader of ``role``: the only one when every key has it, else the largest
    group of that role when the file is an all-in-one checkpoint; None when keys are the model's own."""
    groups = prefix_groups(keys)
    if ("", "") in groups and len(groups) == 1:
        return None
    if len(groups) == 1:
        return next(iter(groups))[0]
    of_role = [(count, prefix) for (prefix, r), count in groups.items() if r == role]
    if not of_role or groups.get(("", ""), 0) > max(of_role)[0]:
        return None
    return max(of_role)[1]


def strip(checkpoint: Checkpoint, prefix: str) -> Checkpoint:
    """A view of ``checkpoint`` keeping the keys under ``prefix``, without it."""
    n = len(prefix)

    def keyed(d: dict) -> dict:
        return {k[n:]: v for k, v in d.items() if k.startswith(prefix)}

    stripped = dataclasses.replace(checkpoint, shapes=keyed(dict(checkpoint.shapes)),
                                   unavailable=keyed(checkpoint.unavailable), _files=keyed(checkpoint._files),
                                   _gguf=keyed(checkpoint._gguf), _tensors=keyed(checkpoint._tensors),
                                   comfy_prefix=prefix)
    return stripped


def role_of(subfolder: str) -> str:
    return ROLE_OF_SUBFOLDER.get(subfolder, TEXT)


def without_comfy_prefix(checkpoint: Checkpoint, role: str, log=None) -> Checkpoint:
    """``checkpoint``, or its view without the ComfyUI prefix its keys carry (said in one log line)."""
    if not isinstance(checkpoint.shapes, dict):  # an indexed release folder
        return checkpoint
    prefix = choose_prefix(checkpoint.shapes, role)
    if prefix is None:
        return checkpoint
    stripped = strip(checkpoint, prefix)
    if log is not None:
        others = len(checkpoint.shapes) - len(stripped.shapes)
        log.info("%s: keys carry ComfyUI's prefix %r; reading its %d %s tensors without it%s", checkpoint.source,
                 prefix, len(stripped.shapes), role, f" (ignoring {others} others)" if others else "")
    return stripped
