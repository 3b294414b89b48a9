"""The 16-channel KL VAE of GLM-Image and CogView4 (diffusers ``AutoencoderKL`` key names and config).

Latents handed to and from the pack are *normalized*: GLM-Image uses per-channel ``latents_mean`` /
``latents_std`` (its ``scaling_factor`` 0.18215 is unused), CogView4 ``scaling_factor`` 1.0 and
``shift_factor`` 0.0. Images are ComfyUI ``IMAGE`` tensors: float ``[B, H, W, 3]`` in 0..1.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import reading
from ..formats.reading import CheckpointError
from ..loading import components
from ..loading.configs import known_fields
from ..runtime.attention import attention
from ..runtime.checks import check_finite_output
from ..runtime.devices import compute_device
from ..runtime.geometry import check_multiple_of

log = logging.getLogger("glm_image_nodes")

FP16_REASON = "the VAE's activations overflow fp16 (NaN, black images)."

GLM_IMAGE_LATENTS_MEAN = (-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875,
                          -0.9453125, 0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125,
                          -1.59375, -0.81640625, -0.255859375)
GLM_IMAGE_LATENTS_STD = (3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                         2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625)

# The latent normalization of each family, for single files that come without a config.json.
FAMILY_NORMALIZATION = {
    "glm_image": {"scaling_factor": 0.18215, "shift_factor": None,
                  "latents_mean": list(GLM_IMAGE_LATENTS_MEAN), "latents_std": list(GLM_IMAGE_LATENTS_STD)},
    "cogview4": {"scaling_factor": 1.0, "shift_factor": 0.0, "latents_mean": None, "latents_std": None},
}


@dataclass
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that matter here (defaults: diffusers')."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "VAEConfig":
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{source}: _class_name is {cfg['_class_name']!r}, not AutoencoderKL. "
                                  f"Choose the vae/ folder of a GLM-Image or CogView4 release.")
        for key, wanted in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != wanted for t in cfg.get(key, [wanted])):
                raise CheckpointError(f"{source}: {key} {cfg[key]} is not supported (only {wanted}).")
        if cfg.get("act_fn", "silu") != "silu":
            raise CheckpointError(f"{source}: act_fn {cfg['act_fn']!r} is not supported (only silu).")
        config = cls(**known_fields(cls, cfg))
        for k in ("latents_mean", "latents_std"):
            values = getattr(config, k)
            if values is not None and len(values) != config.latent_channels:
                raise CheckpointError(f"{source}: {k} has {len(values)} values but latent_channels is "
                                      f"{config.latent_channels}.")
        return config


# ---- building blocks (diffusers names) -------------------------------------------------------------
def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """One head over all pixels, as diffusers' mid-block ``Attention`` (head_dim = channels)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(s).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in -1..1 ``[B,3,H,W]`` -> the posterior mean (= mode) ``[B,C,H/8,W/8]``, unnormalized."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h[:, :self.config.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalized latents -> pixels in about -1..1."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ---- tiled decode ------------------------------------------------------------------------------------
def tile_layout(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Origins and common length of the fewest tiles of at most ``tile`` that cover ``size`` with about
    ``overlap`` shared between neighbours. With ``overlap <= tile / 3`` no pixel is in three tiles."""
    if size <= tile:
        return [0], size
    count = -(-(size - overlap) // (tile - overlap))
    length = -(-(size + (count - 1) * overlap) // count)
    return [round(i * (size - length) / (count - 1)) for i in range(count)], length


def blend_weights(starts: list[int], length: int, scale: int) -> list[torch.Tensor]:
    """1-D weights per tile in output pixels: linear ramps across each overlap with a neighbour, 1 elsewhere;
    neighbouring weights sum to 1 inside every overlap."""
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(length * scale)
        if i > 0:
            n = (starts[i - 1] + length - start) * scale
            w[:n] = (torch.arange(n) + 0.5) / n
        if i < len(starts) - 1:
            n = (start + length - starts[i + 1]) * scale
            w[w.numel() - n:] = (n - 0.5 - torch.arange(n)) / n
        weights.append(w)
    return weights


class GlmVAE:
    """The loaded VAE plus its latent normalization; what the pack's VAE socket carries."""

    # Peak activation of an untiled decode, in full-resolution tensors of the last up block's width: the
    # resnet input, its two convolution outputs, GroupNorm and SiLU temporaries, and the upsampler.
    DECODE_TENSORS_AT_FULL_RES = 6

    def fits_untiled(self, height: int, width: int, device: torch.device | None = None) -> bool:
        """Whether an untiled decode to ``height`` x ``width`` fits the free memory of the CUDA ``device``
        (None: where the weights are; always on other devices). Tiles use their own GroupNorm statistics, so
        tiling changes pixels slightly: it is only chosen when the exact decode would run out of memory."""
        device = compute_device(device, self.device)
        if device.type != "cuda":
            return True
        channels = self.model.config.block_out_channels[0]
        element = self.model.decoder.conv_out.weight.element_size()
        need = self.DECODE_TENSORS_AT_FULL_RES * channels * height * width * element
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.8 * free

    def __init__(self, model: AutoencoderKL):
        self.model = model
        cfg = model.config
        self.latents_mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1) if cfg.latents_mean else None
        self.latents_std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1) if cfg.latents_std else None
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor or 0.0

    @property
    def device(self) -> torch.device:
        # where the weights are; a stage computes on the device its caller passes (block swap, partial loads)
        return self.model.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return self.model.downscale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            return (z - self.latents_mean.to(z)) / self.latents_std.to(z)
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            return z * self.latents_std.to(z) + self.latents_mean.to(z)
        return z / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
        """ComfyUI images ``[B,H,W,3]`` 0..1 -> normalized latents ``[B,C,H/8,W/8]`` (posterior mode), in the
        VAE's dtype on ``device`` (the compute device; None: where the weights are). H and W must be multiples
        of 8."""
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"VAE encode expects images [B, H, W, 3]; got shape {tuple(images.shape)}.")
        _, h, w, _ = images.shape
        check_multiple_of(h, w, self.downscale, "VAE encode")
        device, dtype = compute_device(device, self.device), self.dtype
        out = []
        for image in images[..., :3]:
            x = image.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype) * 2 - 1
            out.append(self.normalize(self.model.encode_mode(x)))
        return check_finite_output(torch.cat(out), "VAE encode", dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tiled: bool | None = None, tile_size: int = 128,
               overlap: int = 32, progress: Callable[..., Any] | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """Normalized latents ``[B,C,h,w]`` -> images ``[B,8h,8w,3]`` float32 0..1 on the CPU.

        ``tiled``: None tiles only when the exact decode would not fit the free GPU memory (``fits_untiled``);
        ``tile_size`` and ``overlap`` (at most a third of it) are in latent pixels.
        The untiled path is exact; tiles are blended linearly across their overlaps.
        ``progress``: a bar for the tiles, ``progress(total, desc=...)`` used as a context manager whose
        ``update()`` is called per tile (the driving node passes ``host.progress.Progress``, which also honours
        the user's interrupt); None: none. ``device``: the compute device (None: where the weights are).
        """
        c = self.model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"VAE decode expects latents [B, {c}, h, w]; got shape {tuple(latents.shape)}.")
        if tile_size < 8 or not 0 <= overlap <= tile_size // 3:
            raise ValueError(f"tile_size must be >= 8 and overlap in 0..tile_size/3; got {tile_size}, {overlap}.")
        h, w = latents.shape[-2:]
        device = compute_device(device, self.device)
        if tiled is None:
            tiled = not self.fits_untiled(h * self.downscale, w * self.downscale, device)
        images = []
        for z in latents:
            z = self.denormalize(z.unsqueeze(0).to(device=device, dtype=self.dtype))
            x = self._decode_tiled(z, tile_size, overlap, progress) if tiled else self.model.decode(z).float()
            check_finite_output(x, "VAE decode", self.dtype)  # before the clamp would turn inf into 0 or 1
            images.append((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return torch.cat(images)

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int,
                      progress: Callable[..., Any] | None) -> torch.Tensor:
        f = self.downscale
        h, w = z.shape[-2:]
        (rows, tile_h), (cols, tile_w) = tile_layout(h, tile, overlap), tile_layout(w, tile, overlap)
        row_w, col_w = blend_weights(rows, tile_h, f), blend_weights(cols, tile_w, f)
        out = torch.zeros(1, self.model.config.out_channels, h * f, w * f, device=z.device)
        bar = progress(len(rows) * len(cols), desc="VAE decode (tiled)") if progress is not None else nullcontext()
        with bar as progress:
            for y, wy in zip(rows, row_w):
                for x, wx in zip(cols, col_w):
                    pixels = self.model.decode(z[..., y:y + tile_h, x:x + tile_w]).float()
                    weight = (wy[:, None] * wx[None, :]).to(z.device)
                    region = (..., slice(y * f, (y + tile_h) * f), slice(x * f, (x + tile_w) * f))
                    out[region] += pixels * weight  # the weights of overlapping tiles sum to 1
                    if progress is not None:
                        progress.update()
        return out


# ---- loading -----------------------------------------------------------------------------------------
def check_format(keys: list[str], source: str) -> None:
    if "encoder.conv_in.weight" not in keys or "decoder.conv_in.weight" not in keys:
        sample = ", ".join(sorted(keys)[:3])
        raise CheckpointError(
            f"{source} is not a diffusers-format AutoencoderKL (no encoder.conv_in.weight / decoder.conv_in.weight; "
            f"its keys start with {sample}). Use the vae/ folder of the GLM-Image or CogView4 release, or its "
            f"diffusion_pytorch_model.safetensors.")


def infer_config(keys_and_shapes: dict[str, tuple[int, ...]], family: str) -> VAEConfig:
    """A config for a single file without config.json: architecture from the tensor shapes, normalization
    and GroupNorm groups from ``family``'s release config."""
    levels = 1 + max(int(k.split(".")[2]) for k in keys_and_shapes if k.startswith("encoder.down_blocks."))
    channels = tuple(keys_and_shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels))
    layers = 1 + max(int(k.split(".")[4]) for k in keys_and_shapes if k.startswith("encoder.down_blocks.0.resnets."))
    return VAEConfig(
        latent_channels=keys_and_shapes["decoder.conv_in.weight"][1],
        block_out_channels=channels,
        layers_per_block=layers,
        norm_num_groups=32,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in keys_and_shapes,
        use_quant_conv="quant_conv.weight" in keys_and_shapes,
        use_post_quant_conv="post_quant_conv.weight" in keys_and_shapes,
        **FAMILY_NORMALIZATION[family])


def _config_from_shapes(family: str | None):
    def infer(shapes: dict[str, tuple[int, ...]], source: str) -> VAEConfig:
        if family is None:
            log.info("VAE: %s has no config.json; using GLM-Image's latent normalization (per-channel mean/std). "
                     "Pass family='cogview4' for a CogView4 VAE.", os.path.basename(source))
        return infer_config(shapes, family or "glm_image")
    return infer


SPEC = components.ComponentSpec(
    name="The VAE", architecture="vae", subfolder="vae", config_type=VAEConfig, build=AutoencoderKL,
    config_from_dict=VAEConfig.from_dict, config_from_shapes=_config_from_shapes(None), fp16_reason=FP16_REASON,
    check=check_format)


def load_vae(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
             family: str | None = None, config: dict | str | None = None,
             compute_device: torch.device | str | None = None) -> GlmVAE:
    """Load the VAE from a release root, its ``vae/`` folder or a single safetensors file.

    ``config``: a config dict or config.json path that replaces the checkpoint's own. ``family``
    (``"glm_image"`` or ``"cogview4"``) picks the latent normalization for a file without a config
    (default GLM-Image's).
    """
    if family is not None and family not in FAMILY_NORMALIZATION:
        raise ValueError(f"family must be one of {', '.join(FAMILY_NORMALIZATION)}; got {family!r}.")
    if isinstance(config, str):
        config = reading.read_json(config)
    component = reading.component_path(path, "vae")
    if config is None and family is not None and reading.config_or_none(component) is not None:
        log.info("VAE: %s has a config.json; its latent normalization is used, not family=%s.", component, family)
    spec = dataclasses.replace(SPEC, config_from_shapes=_config_from_shapes(family))
    typed = VAEConfig.from_dict(config, source=component) if config is not None else None
    return GlmVAE(components.load_component(spec, path, dtype, device, compute_device=compute_device, config=typed))
