"""The CogView4-6B DiT (diffusers ``CogView4Transformer2DModel``) on the GLM-Image decoder's blocks.

Differences from GLM-Image: a linear text projection instead of the glyph projector, no prior tokens, a
timestep sincos as wide as the model, the conditions ``[original_size, crop, target_size]``, RoPE positions
stretched onto a 256-long table, and no reference cache.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dit import DiTTrunk, TimeConditionEmbed, infer_trunk_config, load_dit, patchify, require_keys, rope_2d
from .step_cache import BranchCache

# transformer/config.json of THUDM/CogView4-6B
COGVIEW4_DIT_CONFIG = {
    "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 28, "attention_head_dim": 128,
    "num_attention_heads": 32, "text_embed_dim": 4096, "time_embed_dim": 512, "condition_dim": 256,
    "rope_axes_dim": [256, 256],
}


class CogView4PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int, text_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size ** 2, dim)
        self.text_proj = nn.Linear(text_dim, dim)


class CogView4DiT(DiTTrunk):
    """``forward`` returns the predicted velocity (noise - x0)."""

    def __init__(self, config: dict):
        super().__init__(config)
        c, dim = self.config, self.dim
        self.rope_axes = tuple(c["rope_axes_dim"])
        self.patch_embed = CogView4PatchEmbed(c["in_channels"], dim, c["patch_size"], c["text_embed_dim"])
        self.time_condition_embed = TimeConditionEmbed(c["time_embed_dim"], dim, c["condition_dim"], 3)
        self.add_trunk()

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, original_size: torch.Tensor,
                target_size: torch.Tensor, crop: torch.Tensor, text_pad: tuple[int, ...] | None = None,
                step_cache: BranchCache | None = None) -> torch.Tensor:
        """latents ``[B,16,h,w]``, text ``[B,L,4096]`` (GLM-4 hidden states), timestep ``[B]`` (unshifted),
        sizes and crop ``[B,2]`` in pixels; ``text_pad``: leading padding tokens per sample; ``step_cache``: see
        ``step_cache.BranchCache``. Returns the velocity ``[B,16,h,w]`` in the model's dtype."""
        b, _, h, w = latents.shape
        p = self.patch_size
        dtype = self.dtype
        x = self.patch_embed.proj(patchify(latents.to(dtype), p))
        text = self.patch_embed.text_proj(text.to(dtype))
        device = x.device
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(b)
        temb = self.time_condition_embed(timestep, [original_size.to(device), crop.to(device), target_size.to(device)],
                                         dtype)
        rows = torch.arange(h // p, device=device) * self.rope_axes[0] // (h // p)
        cols = torch.arange(w // p, device=device) * self.rope_axes[1] // (w // p)
        rope = rope_2d(rows, cols, self.head_dim)
        x = self.run_blocks(x, text, temb, rope, text_pad=text_pad, step_cache=step_cache)
        return self.output(x, temb, h, w)


def infer_cogview4_config(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    require_keys(shapes, ["patch_embed.proj.weight", "patch_embed.text_proj.weight", "proj_out.weight",
                          "time_condition_embed.condition_embedder.linear_1.weight"], source, "CogView4 DiT")
    return infer_trunk_config(shapes, source, defaults=COGVIEW4_DIT_CONFIG, patch_key="patch_embed.proj.weight",
                              text_key="patch_embed.text_proj.weight", num_conditions=3)


def load_cogview4_decoder(path: str, dtype: str = "auto", device: torch.device | str | None = None) -> CogView4DiT:
    """Load the CogView4 DiT from a release root, its ``transformer/`` folder or a single .safetensors file.

    ``dtype``: ``auto`` (bf16 where supported, else fp32), ``bf16`` or ``fp32``; fp16 is refused.
    """
    return load_dit(path, dtype, device, model_class=CogView4DiT, class_name="CogView4Transformer2DModel",
                    infer=infer_cogview4_config, defaults=COGVIEW4_DIT_CONFIG, component="The CogView4 decoder")
