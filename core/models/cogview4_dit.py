"""The CogView4-6B DiT (diffusers ``CogView4Transformer2DModel``) on the GLM-Image decoder's blocks.

Differences from GLM-Image: a linear text projection instead of the glyph projector, no prior tokens, a
timestep sincos as wide as the model, the conditions ``[original_size, crop, target_size]``, RoPE positions
stretched onto a 256-long table, and no reference cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..loading import components
from ..runtime.options import RunOptions
from .dit import DiTConfig, DiTTrunk, TimeConditionEmbed, dit_spec, trunk_fields_from_shapes
from .step_cache import BranchCache


@dataclass
class CogView4DiTConfig(DiTConfig):
    """transformer/config.json of THUDM/CogView4-6B (the defaults are the release's values)."""
    CLASS_NAME: ClassVar[str] = "CogView4Transformer2DModel"
    num_layers: int = 28
    text_embed_dim: int = 4096
    rope_axes_dim: tuple[int, int] = (256, 256)


class CogView4PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int, text_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size ** 2, dim)
        self.text_proj = nn.Linear(text_dim, dim)


class CogView4DiT(DiTTrunk):
    """``forward`` returns the predicted velocity (noise - x0)."""

    def __init__(self, config: CogView4DiTConfig):
        super().__init__(config)
        c, dim = self.config, self.dim
        self.rope_axes = tuple(c.rope_axes_dim)
        self.patch_embed = CogView4PatchEmbed(c.in_channels, dim, c.patch_size, c.text_embed_dim)
        self.time_condition_embed = TimeConditionEmbed(c.time_embed_dim, dim, c.condition_dim, 3)
        self.add_trunk()

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, original_size: torch.Tensor,
                target_size: torch.Tensor, crop: torch.Tensor, text_pad: tuple[int, ...] | None = None,
                step_cache: BranchCache | None = None, options: RunOptions | None = None) -> torch.Tensor:
        """latents ``[B,16,h,w]``, text ``[B,L,4096]`` (GLM-4 hidden states), timestep ``[B]`` (unshifted),
        sizes and crop ``[B,2]`` in pixels; ``text_pad``: leading padding tokens per sample; ``step_cache``: see
        ``step_cache.BranchCache``; ``options``: see ``RunOptions``. Returns the velocity ``[B,16,h,w]`` in the
        model's dtype."""
        b, _, h, w = latents.shape
        p = self.patch_size
        dtype = self.dtype
        x = self.patch_embed.proj(self.patches(latents.to(dtype)))
        text = self.patch_embed.text_proj(text.to(dtype))
        device = x.device
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(b)
        temb = self.time_condition_embed(timestep, [original_size.to(device), crop.to(device), target_size.to(device)],
                                         dtype)
        rows = torch.arange(h // p, device=device) * self.rope_axes[0] // (h // p)
        cols = torch.arange(w // p, device=device) * self.rope_axes[1] // (w // p)
        rope = self.rope(rows, cols)
        x = self.run_blocks(x, text, temb, rope, text_pad=text_pad, step_cache=step_cache, options=options)
        return self.output(x, temb, h, w)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> CogView4DiTConfig:
    return CogView4DiTConfig(**trunk_fields_from_shapes(
        shapes, source, defaults=CogView4DiTConfig(), what="CogView4 DiT",
        required=["proj_out.weight", "time_condition_embed.condition_embedder.linear_1.weight"],
        patch_key="patch_embed.proj.weight", text_key="patch_embed.text_proj.weight", num_conditions=3))


SPEC = dit_spec("The CogView4 decoder", "cogview4_dit", CogView4DiTConfig, CogView4DiT, config_from_shapes)


def load_cogview4_decoder(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                          compute_device: torch.device | str | None = None) -> CogView4DiT:
    """Load the CogView4 DiT from a release root, its ``transformer/`` folder, a single .safetensors file or a
    converted FP8 / GGUF file. ``dtype``: auto (bf16 where supported, else fp32), bf16, fp32 or fp8_e4m3fn;
    fp16 is refused."""
    return components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
