"""Objects passed between the pack's nodes (custom socket types ``GLMIMAGE_*``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .flow_schedule import ShiftSettings

# socket type names
AR_MODEL = "GLMIMAGE_AR"
TOKENIZER = "GLMIMAGE_TOKENIZER"
AR_TOKENIZER = "GLMIMAGE_AR_TOKENIZER"  # the AR prompt's text tokenizer and ids alone (the AR runs on a server)
DECODER = "GLMIMAGE_DECODER"
GLYPH_ENCODER = "GLMIMAGE_GLYPH_ENCODER"
VAE = "GLMIMAGE_VAE"
TOKENS = "GLMIMAGE_TOKENS"
GLYPH = "GLMIMAGE_GLYPH"
REFERENCES = "GLMIMAGE_REFERENCES"
CAPTIONER = "GLMIMAGE_CAPTIONER"
COGVIEW_VQVAE = "GLMIMAGE_COGVIEW_VQVAE"
COGVIEW_VQ_TOKENS = "GLMIMAGE_COGVIEW_VQ_TOKENS"
COGVIEW4_TEXT_ENCODER = "GLMIMAGE_COGVIEW4_TEXT_ENCODER"
COGVIEW4_DECODER = "GLMIMAGE_COGVIEW4_DECODER"
COGVIEW4_CONDITIONING = "GLMIMAGE_COGVIEW4_CONDITIONING"


def upsample_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids ``[..., h, w]`` nearest-upsampled 2x to the decoder's patch grid, flattened row-major:
    ``[..., 2h * 2w]`` (the prior ids the DiT adds to its patch embeddings)."""
    return ids.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1).flatten(-2)


@dataclass
class TokenGrid:
    """Semantic-VQ ids of one or more images at 1/32 of the target size.

    ids: int64 ``[B, H/32, W/32]`` with every value in ``[0, 16384)``.
    preview: int64 ``[B, ph, pw]`` (text-to-image only) or None.
    """
    ids: torch.Tensor
    height: int
    width: int
    preview: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def upsampled(self) -> torch.Tensor:
        """Nearest 2x upsample to the decoder's patch grid, flattened row-major: ``[B, (H/16)*(W/16)]``."""
        return upsample_ids(self.ids)


@dataclass
class GlyphConditioning:
    """Glyph-ByT5 embeddings of the quoted text of a prompt (``cond``) and of ``""`` (``uncond``).

    cond: ``[1, Lg, D]``; uncond: ``[1, Lu, D]``; texts: the strings that were encoded.
    """
    cond: torch.Tensor
    uncond: torch.Tensor
    texts: list[str] = field(default_factory=list)


@dataclass
class ReferenceImages:
    """Reference images for editing, one entry per image.

    latents: normalized VAE latents ``[1, 16, H/8, W/8]``; prior_ids: 2x-upsampled token ids
    ``[(H/16)*(W/16)]``; token_ids: the d32 ids ``[H/32, W/32]``; sizes: pixel ``(H, W)``.
    """
    latents: list[torch.Tensor]
    prior_ids: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    sizes: list[tuple[int, int]]


@dataclass(eq=False)
class ModelHandle:
    """A loaded model as the pack's sockets carry it: ``model`` is what the core functions take (an
    ``nn.Module``, or the VAE / captioner wrapper around one), with where it came from and how it lives in
    memory. ``block_swap`` (outside ComfyUI): that many of the blocks at ``blocks`` stay on the offload device.
    ``patcher``: ComfyUI's ``ModelPatcher`` for it, made on first use inside ComfyUI (see host.memory).
    ``loras``: the LoRAs this handle applies (``lora_patches.AppliedLora``, in order) to the shared model of
    ``base``, the handle without them (see ``lora_patches``)."""
    model: Any
    path: str = ""
    block_swap: int = 0
    blocks: str | None = None
    patcher: Any = field(default=None, repr=False)
    loras: tuple = ()
    base: "ModelHandle | None" = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        """The ``nn.Module`` holding the weights."""
        return self.model if isinstance(self.model, nn.Module) else self.model.model


@dataclass(eq=False)
class ARModel(ModelHandle):
    """The GLM AR model with its text tokenizer (socket ``GLMIMAGE_AR``)."""
    tokenizer: object = None

    @property
    def vocabulary(self):
        """The release's special-token ids and codebook size (``ar_prompt.ARVocabulary``, read from its config)."""
        return self.tokenizer.vocabulary


@dataclass(eq=False)
class Decoder(ModelHandle):
    """A DiT decoder (GLM-Image or CogView4) with its release's scheduler settings."""
    shift_settings: ShiftSettings = field(default_factory=ShiftSettings)


@dataclass
class CogView4Conditioning:
    """CogView4 prompt embeddings (``hidden_states[-2]`` of the GLM-4 text encoder): ``[1, L, 4096]`` each."""
    cond: torch.Tensor
    uncond: torch.Tensor
    prompt: str = ""


@dataclass(eq=False)
class CogView4TextEncoder(ModelHandle):
    """The GLM-4-9B text encoder with its tokenizer (socket ``GLMIMAGE_COGVIEW4_TEXT_ENCODER``)."""
    tokenizer: object = None
