"""The GLM-Image DiT decoder (diffusers ``GlmImageTransformer2DModel``) on the shared trunk.

GLM-Image's inputs: 2x2 latent patches plus the embedding of the 2x-upsampled semantic-VQ prior ids (zeroed
when dropped for CFG), the glyph projector for the Glyph-ByT5 text stream, the conditions ``[crop, target_size]``
and raw (unstretched) 2D RoPE positions. Editing adds a reference K/V cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading import components
from ..runtime.options import RunOptions
from .dit import (
    KV_MODES,
    DiTConfig,
    DiTTrunk,
    FeedForward,
    ReferenceKVCache,
    TimeConditionEmbed,
    dit_spec,
    patchify,
    trunk_fields_from_shapes,
)
from .step_cache import BranchCache


@dataclass
class GlmImageDiTConfig(DiTConfig):
    """transformer/config.json of zai-org/GLM-Image (the defaults are the release's values)."""
    CLASS_NAME: ClassVar[str] = "GlmImageTransformer2DModel"
    prior_vq_quantizer_codebook_size: int = 16384


# ---- the decoder -----------------------------------------------------------------------------------------------
class PatchProjector(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size ** 2, dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(latents, self.patch_size))


class GlmImageDiT(DiTTrunk):
    """The GLM-Image diffusion decoder; ``forward`` returns the predicted velocity (noise - x0)."""

    def __init__(self, config: GlmImageDiTConfig):
        super().__init__(config)
        c, dim = self.config, self.dim
        self.codebook_size = c.prior_vq_quantizer_codebook_size
        self.image_projector = PatchProjector(c.in_channels, dim, c.patch_size)
        self.glyph_projector = FeedForward(c.text_embed_dim, dim, dim, F.gelu)
        self.prior_token_embedding = nn.Embedding(c.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = FeedForward(dim, dim, dim, F.silu)
        self.time_condition_embed = TimeConditionEmbed(c.time_embed_dim, c.time_embed_dim, c.condition_dim, 2)
        self.add_trunk()

    def new_kv_cache(self) -> ReferenceKVCache:
        return ReferenceKVCache(self.num_layers)

    def forward(self, latents: torch.Tensor, glyph: torch.Tensor, prior_ids: torch.Tensor,
                prior_drop: bool | torch.Tensor, timestep: torch.Tensor, target_size: torch.Tensor,
                crop: torch.Tensor, kv_cache: ReferenceKVCache | None = None,
                kv_mode: str | None = None, text_pad: tuple[int, ...] | None = None,
                step_cache: BranchCache | None = None, options: RunOptions | None = None) -> torch.Tensor:
        """latents ``[B,16,h,w]``, glyph ``[B,Lg,Dg]``, prior_ids ``[B,(h/2)(w/2)]`` (or ``[N]``, shared),
        prior_drop bool / ``[B]`` / ``[B,N]`` (zero the prior embedding before the projector), timestep ``[B]``
        (what the model is conditioned on, e.g. ``t_raw - 1``), target_size and crop ``[B,2]`` in pixels.
        ``kv_mode``: ``write`` stores this pass's K/V in ``kv_cache``, ``read`` attends over it too,
        ``skip``/None ignores it. ``text_pad``: per sample, how many leading glyph tokens are padding (a
        batched CFG pair of different glyph lengths). ``step_cache``: see ``step_cache.BranchCache``. ``options``:
        attention kernel, kernel mode and regional compile of the blocks (``RunOptions``; None: the defaults).
        Returns the velocity ``[B,16,h,w]`` in the model's dtype."""
        if kv_mode is not None and kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES} or None, got {kv_mode!r}")
        b, _, h, w = latents.shape
        p = self.patch_size
        dtype = self.dtype
        x = self.image_projector(latents.to(dtype))
        text = self.glyph_projector(glyph.to(dtype))

        if prior_ids.dim() == 1:
            prior_ids = prior_ids[None]
        prior = self.prior_token_embedding(prior_ids)
        drop = torch.as_tensor(prior_drop, dtype=torch.bool, device=prior.device)
        drop = drop.view(-1, 1) if drop.dim() == 1 else drop
        prior = torch.where(drop[..., None], torch.zeros((), dtype=prior.dtype, device=prior.device), prior)
        x = x + self.prior_projector(prior)

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        temb = self.time_condition_embed(timestep, [crop.to(x.device), target_size.to(x.device)], dtype)

        device = x.device
        rope = self.rope(torch.arange(h // p, device=device), torch.arange(w // p, device=device))
        x = self.run_blocks(x, text, temb, rope, kv_cache, kv_mode, text_pad, step_cache, options)
        return self.output(x, temb, h, w)


# ---- loading ---------------------------------------------------------------------------------------------------
def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> GlmImageDiTConfig:
    """A config from tensor shapes; the head split (not visible in shapes) keeps the real head_dim of 128."""
    found = trunk_fields_from_shapes(
        shapes, source, defaults=GlmImageDiTConfig(), what="GLM-Image DiT",
        required=["prior_token_embedding.weight", "proj_out.weight",
                  "time_condition_embed.condition_embedder.linear_1.weight"],
        patch_key="image_projector.proj.weight", text_key="glyph_projector.net.0.proj.weight", num_conditions=2)
    return GlmImageDiTConfig(**found, prior_vq_quantizer_codebook_size=shapes["prior_token_embedding.weight"][0])


SPEC = dit_spec("The GLM-Image decoder", "glm_image_dit", GlmImageDiTConfig, GlmImageDiT, config_from_shapes)


def load_decoder(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                 compute_device: torch.device | str | None = None) -> GlmImageDiT:
    """Load the GLM-Image DiT from a release root, its ``transformer/`` folder, a single .safetensors file or a
    converted FP8 / GGUF file. ``dtype``: auto (bf16 where supported, else fp32), bf16, fp32 or fp8_e4m3fn;
    fp16 is refused. Its release's scheduler settings: ``stages.flow_schedule.release_shift_settings(path)``."""
    return components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
