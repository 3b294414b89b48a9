"""GLM-Image's semantic tokenizer: the SigLIP-style vision encoder and cosine VQ of
``vision_language_encoder`` (``model.visual.*``, ``model.vqmodel.*``), which turn a reference image into
the d32 token ids the AR model and the decoder read.

image -> smart_resize (about half size, multiples of 16) -> bicubic, (x - 0.5) / 0.5
      -> 16x16 patch conv + 128x128 learned position table resampled to the grid (grid_sample)
      -> pre-LN ViT blocks (no final norm) -> quant_conv 1x1 -> nearest unit-norm codebook row
An H x W image (multiples of 32, sides in 512..2048) gives an (H/32) x (W/32) grid.

Only these tensors are read: the 9B language model in the same checkpoint is never touched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..formats import reading
from ..formats.reading import CheckpointError
from ..loading import components
from ..loading.configs import known_fields
from ..runtime.attention import attention
from ..runtime.devices import compute_device
from ..runtime.geometry import MAX_PIXELS, MIN_PIXELS, PATCH_SIZE, check_token_grid_size, smart_resize
from ..runtime.images import resize_reference, to_rgb01, to_uint8

VISION_PREFIX = "model.visual."
VQ_PREFIX = "model.vqmodel."
UNUSED_PREFIX = "model.vqmodel.post_quant_conv."   # maps codes back to features; tokenizing never needs it


@dataclass
class SemanticTokenizerConfig:
    depth: int = 40
    hidden_size: int = 1536
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 16
    image_size: int = 2048            # position table side = image_size / patch_size
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    embed_dim: int = 2048             # codebook width
    num_embeddings: int = 16384
    min_pixels: int = MIN_PIXELS      # processor limits (processor/preprocessor_config.json)
    max_pixels: int = MAX_PIXELS

    @classmethod
    def from_release_config(cls, config: dict, source: str) -> "SemanticTokenizerConfig":
        vision, vq = config.get("vision_config"), config.get("vq_config")
        if not isinstance(vision, dict) or not isinstance(vq, dict):
            raise CheckpointError(f"{source}: config.json has no vision_config/vq_config; point the loader at the "
                                  f"vision_language_encoder folder of GLM-Image (or its release root).")
        if vision.get("hidden_act", "gelu") != "gelu" or vision.get("spatial_merge_size", 1) != 1:
            raise CheckpointError(f"{source}: vision_config has hidden_act={vision.get('hidden_act')!r}, "
                                  f"spatial_merge_size={vision.get('spatial_merge_size')}; only GLM-Image's "
                                  f"gelu / merge 1 encoder is supported.")
        values = known_fields(cls, vision)
        values.update(embed_dim=vq.get("embed_dim", cls.embed_dim),
                      num_embeddings=vq.get("num_embeddings", cls.num_embeddings))
        return cls(**values)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "SemanticTokenizerConfig":
        """For a single file without config: everything but ``num_heads`` and ``layer_norm_eps`` (which
        shapes do not show; the release values are used) comes from the tensor shapes."""
        hidden, in_channels, patch, _ = shapes[VISION_PREFIX + "patch_embed.proj.weight"]
        table = shapes[VISION_PREFIX + "embeddings.position_embedding.weight"][0]
        side = int(round(table ** 0.5))
        depth = len({k.split(".")[3] for k in shapes if k.startswith(VISION_PREFIX + "blocks.")})
        num_embeddings, embed_dim = shapes[VQ_PREFIX + "quantize.embedding.weight"]
        return cls(depth=depth, hidden_size=hidden,
                   intermediate_size=shapes[VISION_PREFIX + "blocks.0.mlp.fc1.weight"][0], patch_size=patch,
                   image_size=side * patch, in_channels=in_channels,
                   attention_bias=VISION_PREFIX + "blocks.0.attn.qkv.bias" in shapes,
                   embed_dim=embed_dim, num_embeddings=num_embeddings)


class VisionAttention(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, scale=q.shape[-1] ** -0.5)     # bidirectional, within one image
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class PositionEmbedding(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(side * side, cfg.hidden_size)

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned square table sampled bilinearly at the centres of a grid_h x grid_w grid: ``[gh*gw, C]``."""
        weight = self.position_embedding.weight
        side = int(round(weight.shape[0] ** 0.5))
        table = weight.view(side, side, -1).permute(2, 0, 1)[None].float()
        ys = (torch.arange(grid_h, device=weight.device) + 0.5) / grid_h * 2 - 1
        xs = (torch.arange(grid_w, device=weight.device) + 0.5) / grid_w * 2 - 1
        grid = torch.stack((xs[None, :].expand(grid_h, grid_w), ys[:, None].expand(grid_h, grid_w)), dim=-1)[None]
        pos = F.grid_sample(table, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return pos[0].flatten(1).t().to(weight.dtype)


class VisionModel(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.embeddings = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` normalized pixels -> features ``[B, (h/16)*(w/16), C]`` in raster order."""
        proj = self.patch_embed.proj
        x = proj(pixels.to(proj.weight.dtype))
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.embeddings(grid_h, grid_w)
        for block in self.blocks:
            x = block(x)
        return x


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> ids ``[N]``: the nearest codebook row after L2-normalizing both (max cosine).
        The squared distance is written as the reference writes it, so near-ties break the same way."""
        z = F.normalize(z, dim=-1)
        codes = F.normalize(self.embedding.weight.to(z.dtype), dim=-1)
        distances = (z ** 2).sum(1, keepdim=True) + (codes ** 2).sum(1) - 2 * z @ codes.t()
        return distances.argmin(dim=1)


class VQModel(nn.Module):
    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.quant_conv = nn.Conv2d(cfg.hidden_size, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg)


class SemanticTokenizer(nn.Module):
    """Pixels ``[B, 3, h, w]`` (normalized, sides multiples of 16) -> ids ``[B, h/16, w/16]`` int64."""

    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict({"visual": VisionModel(cfg), "vqmodel": VQModel(cfg)})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision features ``[B, C, h/16, w/16]`` (what transformers' ``get_image_features`` returns per image)."""
        x = self.model["visual"](pixels)
        b, _, c = x.shape
        return x.transpose(1, 2).reshape(b, c, pixels.shape[-2] // self.config.patch_size, -1)

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``[B, C, gh, gw]`` -> ids ``[B, gh, gw]``. Works on any rescaling of the features."""
        vq = self.model["vqmodel"]
        z = vq.quant_conv(features.to(vq.quant_conv.weight.dtype))
        b, _, gh, gw = z.shape
        return vq.quantize(z.permute(0, 2, 3, 1).reshape(b * gh * gw, -1)).view(b, gh, gw)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.features(pixels))


# ---- preprocessing (GlmImageImageProcessor) --------------------------------------------------------

def preprocess_image(image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """An image (anything ``to_rgb01`` takes) -> normalized pixels ``[1, 3, h, w]`` float32 exactly as the
    processor (PIL backend) makes them: 8-bit, ``smart_resize`` size, PIL bicubic, ``(x/255 - 0.5) / 0.5``.

    The torchvision backend of the processor (used when torchvision is installed) resizes with torch's
    uint8 antialiased bicubic instead, which differs from PIL by at most 1-2 levels on under 1% of pixels."""
    pixels = Image.fromarray(to_uint8(to_rgb01(image)))
    h, w = smart_resize(pixels.height, pixels.width, factor=patch_size, min_pixels=min_pixels, max_pixels=max_pixels)
    pixels = np.asarray(pixels.resize((w, h), resample=Image.BICUBIC))
    x = torch.from_numpy(pixels.astype(np.float64) * (1 / 255)).float()   # the processor's rescale: in float64
    return ((x - 0.5) / 0.5).permute(2, 0, 1)[None].contiguous()


def tokenize_image(tokenizer: SemanticTokenizer, image, target_height: int | None = None,
                   target_width: int | None = None, *, device: torch.device | None = None) -> torch.Tensor:
    """Token ids ``[h, w]`` int64 of one image (``[H, W, 3]`` in 0..1, or anything ``to_rgb01`` takes).

    With a target (output) size the image is first resized to it the way diffusers resizes references (PIL
    Lanczos), so the grid is exactly ``(target_height / 32, target_width / 32)`` and matches the decoder grid
    of that size. Below the processor's minimum side (512 px) the processor would enlarge the image and change
    the grid, so its minimum is lowered to the target's short side. Without a target the processor's own
    ``smart_resize`` decides; the grid of an H x W image is (H/32, W/32) when H and W are multiples of 32 with
    sides in 512..2048. ``device``: the compute device (None: where the weights are).
    """
    image = to_rgb01(image)
    cfg = tokenizer.config
    if (target_height is None) != (target_width is None):
        raise ValueError("Give both target_height and target_width, or neither.")
    min_pixels = cfg.min_pixels
    if target_height is not None:
        check_token_grid_size(target_height, target_width, cfg.max_pixels)
        min_pixels = min(min_pixels, min(target_height, target_width) ** 2)
        image = resize_reference(image, target_height, target_width)
    pixels = preprocess_image(image, min_pixels=min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size)
    weight = tokenizer.model["visual"].patch_embed.proj.weight
    return tokenizer(pixels.to(device=compute_device(device, weight.device), dtype=weight.dtype))[0].cpu()


def tokenize_images(tokenizer: SemanticTokenizer, images, target_height: int | None = None,
                    target_width: int | None = None, *, device: torch.device | None = None) -> list[torch.Tensor]:
    """``tokenize_image`` for each image of a list or a ComfyUI batch ``[B, H, W, 3]``; one ``[h, w]`` grid each."""
    return [tokenize_image(tokenizer, image, target_height, target_width, device=device) for image in images]


# ---- loading ---------------------------------------------------------------------------------------

def _wanted(key: str) -> bool:
    return (key.startswith(VISION_PREFIX) or key.startswith(VQ_PREFIX)) and not key.startswith(UNUSED_PREFIX)


def _check_prefixes(all_keys: list[str], source: str) -> None:
    missing = [p for p in (VISION_PREFIX, VQ_PREFIX) if not any(k.startswith(p) for k in all_keys)]
    if not missing:
        return
    found = sorted({".".join(k.split(".")[:2 if k.startswith("model.") else 1]) + ".*" for k in all_keys})
    has = ", ".join(found[:6]) or "no tensors"
    if found and set(found) <= {"model.language_model.*", "lm_head.*"}:
        has = "only the language model (" + has + ")"
    raise CheckpointError(f"{source}: no {' and no '.join(p + '*' for p in missing)} keys: this checkpoint has {has}. "
                          f"The semantic tokenizer needs the vision encoder (model.visual.*) and the VQ "
                          f"(model.vqmodel.*); use the full vision_language_encoder folder of zai-org/GLM-Image.")


def _processor_limits(path: str) -> dict:
    """min/max pixels from ``processor/preprocessor_config.json`` when ``path`` is a release root."""
    config = os.path.join(path, "processor", "preprocessor_config.json")
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return {}
    values = reading.read_json(config)
    return {k: int(values[k]) for k in ("min_pixels", "max_pixels") if k in values}


SPEC = components.ComponentSpec(
    name="The semantic tokenizer (vision encoder + VQ)", architecture="glm_image_semantic_tokenizer",
    subfolder="vision_language_encoder", config_type=SemanticTokenizerConfig, build=SemanticTokenizer,
    config_from_dict=SemanticTokenizerConfig.from_release_config,
    config_from_shapes=lambda shapes, source: SemanticTokenizerConfig.from_shapes(shapes),
    key_map=lambda keys, config: {k: k for k in keys if _wanted(k)},
    keep_fp32=lambda k: k.startswith(VQ_PREFIX), check=_check_prefixes)


def load_semantic_tokenizer(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                            compute_device: torch.device | str | None = None) -> SemanticTokenizer:
    """Load the vision encoder and VQ from a GLM-Image release root, its ``vision_language_encoder/``
    folder (config.json + sharded safetensors) or a single ``.safetensors`` file holding ``model.visual.*``
    and ``model.vqmodel.*``. Only those tensors are read. The VQ stays in float32 whatever ``dtype`` is,
    so the 16384-way nearest-code search does not tie in bf16."""
    tokenizer = components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
    for name, value in _processor_limits(path).items():
        setattr(tokenizer.config, name, value)
    return tokenizer
