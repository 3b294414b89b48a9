"""The CogView4-6B DiT (diffusers ``CogView4Transformer2DModel``) on the GLM-Image decoder's blocks.

Differences from GLM-Image: a linear text projection instead of the glyph projector, no prior tokens, a
timestep sincos as wide as the model, the conditions ``[original_size, crop, target_size]``, RoPE positions
stretched onto a 256-long table, and no reference cache.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dit import (
    DiTBlock,
    FinalAdaLN,
    TimeConditionEmbed,
    count_layers,
    load_dit,
    patchify,
    require_keys,
    rope_2d,
    unpatchify,
)
from .flow_schedule import ShiftSettings
from .loading import CheckpointError

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


class CogView4DiT(nn.Module):
    """``forward`` returns the predicted velocity (noise - x0)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        dim = c["num_attention_heads"] * c["attention_head_dim"]
        self.patch_size = c["patch_size"]
        self.head_dim = c["attention_head_dim"]
        self.rope_axes = tuple(c["rope_axes_dim"])
        self.patch_embed = CogView4PatchEmbed(c["in_channels"], dim, c["patch_size"], c["text_embed_dim"])
        self.time_condition_embed = TimeConditionEmbed(c["time_embed_dim"], dim, c["condition_dim"], 3)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, c["num_attention_heads"], c["attention_head_dim"], c["time_embed_dim"])
            for _ in range(c["num_layers"]))
        self.norm_out = FinalAdaLN(c["time_embed_dim"], dim)
        self.proj_out = nn.Linear(dim, c["patch_size"] ** 2 * c["out_channels"])
        self.shift_settings = ShiftSettings()

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, original_size: torch.Tensor,
                target_size: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """latents ``[B,16,h,w]``, text ``[B,L,4096]`` (GLM-4 hidden states), timestep ``[B]`` (unshifted),
        sizes and crop ``[B,2]`` in pixels. Returns the velocity ``[B,16,h,w]`` in the model's dtype."""
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
        for block in self.transformer_blocks:
            x, text = block(x, text, temb, rope)
        x = self.proj_out(self.norm_out(x, temb))
        return unpatchify(x, h, w, p)


def infer_cogview4_config(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    require_keys(shapes, ["patch_embed.proj.weight", "patch_embed.text_proj.weight", "proj_out.weight",
                          "time_condition_embed.condition_embedder.linear_1.weight"], source, "CogView4 DiT")
    c = dict(COGVIEW4_DIT_CONFIG)
    dim, patch_in = shapes["patch_embed.proj.weight"]
    c["patch_size"] = int(round((patch_in / c["in_channels"]) ** 0.5))
    c["out_channels"] = shapes["proj_out.weight"][0] // c["patch_size"] ** 2
    c["text_embed_dim"] = shapes["patch_embed.text_proj.weight"][1]
    c["time_embed_dim"] = shapes["time_condition_embed.timestep_embedder.linear_1.weight"][0]
    c["condition_dim"] = shapes["time_condition_embed.condition_embedder.linear_1.weight"][1] // 6
    c["num_layers"] = count_layers(shapes, source)
    if dim % c["attention_head_dim"]:
        raise CheckpointError(f"{source}: inner dim {dim} is not a multiple of head_dim {c['attention_head_dim']}; "
                              f"put the transformer's config.json beside the weights.")
    c["num_attention_heads"] = dim // c["attention_head_dim"]
    return c


def load_cogview4_decoder(path: str, dtype: str = "auto", device: torch.device | str | None = None) -> CogView4DiT:
    """Load the CogView4 DiT from a release root, its ``transformer/`` folder or a single .safetensors file.

    ``dtype``: ``auto`` (bf16 where supported, else fp32), ``bf16`` or ``fp32``; fp16 is refused.
    """
    return load_dit(path, dtype, device, model_class=CogView4DiT, class_name="CogView4Transformer2DModel",
                    infer=infer_cogview4_config, defaults=COGVIEW4_DIT_CONFIG, component="The CogView4 decoder")


def check_cogview4_size(height: int, width: int) -> None:
    """CogView4-6B's limits (its README): sides 512..2048, multiples of 32, at most 2^21 pixels."""
    problems = []
    if not (512 <= height <= 2048 and 512 <= width <= 2048):
        problems.append("each side must be 512..2048 px")
    if height % 32 or width % 32:
        problems.append("both sides must be multiples of 32")
    if height * width > 2 ** 21:
        problems.append(f"at most 2^21 = {2 ** 21} pixels ({height * width} given)")
    if problems:
        raise ValueError(f"CogView4 cannot make {width}x{height} (WxH): {'; '.join(problems)}. "
                         f"Valid sizes include 1024x1024, 1280x768, 768x1280, 1536x1024, 2048x1024 and 1440x1440.")
