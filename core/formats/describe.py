"""What a weight file is, in one phrase for error messages: format, key prefix, architecture tag, stored types.

Every refusal of a weight file says what the file was found to be (so a user can tell a wrong download from a
wrong loader) and a fix that works on that file.
"""
from __future__ import annotations

import shlex

from .checkpoint import GGUF_ARCH, META_ARCH, Checkpoint
from .prefixes import prefix_groups

CONVERT = "python convert.py"


def stored_types(checkpoint: Checkpoint) -> str:
    """``"BF16 x12, F8_E4M3 x40"``: the stored dtypes / GGML types and how many tensors have each."""
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(checkpoint.stored.items()))


def describe(checkpoint: Checkpoint) -> str:
    parts = [f"{checkpoint.format_name} with {len(checkpoint.shapes)} tensors"]
    if checkpoint.stored:
        parts.append(f"stored as {stored_types(checkpoint)}")
    if checkpoint.metadata.get(META_ARCH):
        parts.append(f"converted by glm-image-nodes for {checkpoint.metadata[META_ARCH]!r}")
    elif checkpoint.metadata.get(GGUF_ARCH):
        parts.append(f"architecture tag {checkpoint.metadata[GGUF_ARCH]!r} (another tool's)")
    if checkpoint.comfy_prefix:
        parts.append(f"ComfyUI key prefix {checkpoint.comfy_prefix!r} taken off")
    else:
        prefixes = sorted(p for p, _ in prefix_groups(checkpoint.shapes) if p)
        if prefixes:
            parts.append(f"ComfyUI key prefixes {', '.join(map(repr, prefixes))}")
    return "; ".join(parts)


def convert_command(source: str, fmt: str) -> str:
    """The convert.py command that writes ``source`` as ``fmt`` beside it."""
    stem = source[:-len(".gguf")] if source.endswith(".gguf") else source.removesuffix(".safetensors")
    out = f"{stem}_{fmt}{'.safetensors' if fmt == 'fp8_e4m3fn' else '.gguf'}"
    return f"{CONVERT} {shlex.quote(source)} --format {fmt} --out {shlex.quote(out)}"
