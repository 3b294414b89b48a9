"""The CogView (v1) VQ-VAE, ``vqvae_hard_biggerset_011.pt``: 8x downsampling, 8192 codes of 256 dims.

Three stride-2 convolutions in, three stride-2 transposed convolutions out, no residual blocks
(THUDM/CogView ``vqvae/vqvae_zc.py`` with ``channel=512, n_res_block=0, embed_dim=256, n_embed=8192,
stride=6``). Sequential indices and the ``module.`` prefix of the release are kept, so its state dict
loads strictly. Codes are plain L2 nearest neighbours; the codebook ``quantize_t.embed`` is stored
transposed, ``[dim, n_codes]``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.checkpoint import Checkpoint
from ..formats.reading import CheckpointError
from ..loading import components
from ..runtime.checks import check_finite_output
from ..runtime.devices import compute_device
from ..runtime.geometry import check_multiple_of

MEAN = (0.79093, 0.76271, 0.75340)  # dataset statistics of the release's input normalization
STD = (0.30379, 0.32279, 0.32800)
RELEASE_FILE = "vqvae_hard_biggerset_011.pt"
EMA_STATE = ("quantize_t.cluster_size", "quantize_t.embed_avg")  # training-only buffers, dropped on load
SEARCH_CHUNK = 4096  # positions per distance matrix: 4096 x 8192 fp32 is 128 MiB


class Quantize(nn.Module):
    def __init__(self, dim: int, n_embed: int):
        super().__init__()
        self.register_buffer("embed", torch.empty(dim, n_embed))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, dim]`` -> ``[N]`` ids, the release's distance expansion and argmax of ``-dist``."""
        e = self.embed
        e_sq = e.pow(2).sum(0, keepdim=True)
        ids = [(-(f.pow(2).sum(1, keepdim=True) - 2 * f @ e + e_sq)).max(1).indices for f in z.split(SEARCH_CHUNK)]
        return torch.cat(ids)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.embed.t())


class Encoder(nn.Module):
    def __init__(self, channel: int, embed_dim: int):
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(3, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channel, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channel, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channel, embed_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, channel: int, embed_dim: int):
        super().__init__()
        self.blocks = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(channel, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(channel, channel, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channel, 3, 1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.blocks(q)


class CogViewVQVAE(nn.Module):
    """Images ``[B,H,W,3]`` 0..1 <-> code ids ``[B,H/8,W/8]``; fp32."""

    downscale = 8

    def __init__(self, channel: int = 512, embed_dim: int = 256, n_embed: int = 8192):
        super().__init__()
        self.enc_b = Encoder(channel, embed_dim)
        self.quantize_t = Quantize(embed_dim, n_embed)
        self.dec = Decoder(channel, embed_dim)

    @property
    def device(self) -> torch.device:
        # where the weights are; a stage computes on the device its caller passes (block swap, partial loads)
        return self.quantize_t.embed.device

    @property
    def n_embed(self) -> int:
        return self.quantize_t.embed.shape[1]

    def features(self, images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The encoder's output before quantization, ``[B, H/8, W/8, dim]``, computed on ``device`` (None: where
        the weights are)."""
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"CogView VQ-VAE encode expects images [B, H, W, 3]; got shape {tuple(images.shape)}.")
        _, h, w, _ = images.shape
        check_multiple_of(h, w, self.downscale, "CogView VQ-VAE encode", " (the release was trained at 256x256)")
        x = images[..., :3].to(device=compute_device(device, self.device), dtype=torch.float32)
        x = (x - x.new_tensor(MEAN)) / x.new_tensor(STD)
        return self.enc_b(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
        """Images ``[B,H,W,3]`` in 0..1, H and W multiples of 8 -> ids ``[B,H/8,W/8]`` int64 on the CPU, computed
        on ``device`` (None: where the weights are)."""
        z = self.features(images, device)
        return self.quantize_t.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:-1]).cpu()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
        """Ids ``[B,h,w]`` -> images ``[B,8h,8w,3]`` float32 on the CPU, clamped to 0..1 (the original scripts
        min-max rescale each image instead), computed on ``device`` (None: where the weights are)."""
        if ids.ndim != 3 or ids.is_floating_point():
            raise ValueError(f"CogView VQ-VAE decode expects integer ids [B, h, w]; "
                             f"got {ids.dtype} {tuple(ids.shape)}.")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_embed):
            raise ValueError(f"CogView VQ-VAE ids must be in 0..{self.n_embed - 1}; got {ids.min()}..{ids.max()}.")
        ids = ids.to(device=compute_device(device, self.device), dtype=torch.long)
        q = self.quantize_t.lookup(ids).permute(0, 3, 1, 2)
        x = check_finite_output(self.dec(q).permute(0, 2, 3, 1), "CogView VQ-VAE decode", torch.float32)
        return (x * x.new_tensor(STD) + x.new_tensor(MEAN)).clamp(0, 1).cpu()


# ---- loading -------------------------------------------------------------------------------------------
def read_pt(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: besides tensors it holds pickled Python objects, which could run code when "
            f"loaded ({str(e).splitlines()[0]}). Use the original {RELEASE_FILE} or a .safetensors copy of the "
            f"state dict.") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a bare state dict of tensors (as {RELEASE_FILE} is).")
    return sd


def resolve_file(path: str) -> str:
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".pt", ".pth", ".safetensors")))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one .pt or .safetensors VQ-VAE checkpoint (e.g. {RELEASE_FILE}), "
                                  f"found {found or 'none'}. Choose the file itself.")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist. Download {RELEASE_FILE} (CogView release) and choose it.")
    return path


@dataclass
class CogViewVQVAEConfig:
    channel: int = 512
    embed_dim: int = 256
    n_embed: int = 8192

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], source: str) -> "CogViewVQVAEConfig":
        shapes = {k.removeprefix("module."): v for k, v in shapes.items()}
        for key in ("enc_b.blocks.0.weight", "quantize_t.embed"):
            if key not in shapes:
                raise CheckpointError(f"{source} is not a CogView VQ-VAE: it has no {key} (nor module.{key}).")
        embed_dim, n_embed = shapes["quantize_t.embed"]
        return cls(channel=shapes["enc_b.blocks.0.weight"][0], embed_dim=embed_dim, n_embed=n_embed)


SPEC = components.ComponentSpec(
    name="The CogView VQ-VAE", architecture="cogview_vqvae", subfolder="vqvae", config_type=CogViewVQVAEConfig,
    build=lambda c: CogViewVQVAE(c.channel, c.embed_dim, c.n_embed),
    config_from_dict=lambda d, source: CogViewVQVAEConfig(**d), config_from_shapes=CogViewVQVAEConfig.from_shapes,
    key_map=lambda keys, config: {k: k.removeprefix("module.") for k in keys
                                  if k.removeprefix("module.") not in EMA_STATE})


def load_cogview_vqvae(path: str, device: torch.device | str | None = None) -> CogViewVQVAE:
    """Load the release ``.pt`` (read with ``weights_only=True``) or a ``.safetensors`` copy of it, keys with or
    without the ``module.`` prefix. Sizes are read from the tensors; the model runs in float32."""
    path = resolve_file(path)
    checkpoint = None if path.endswith(".safetensors") else Checkpoint.of_tensors(path, read_pt(path))
    return components.load_component(SPEC, path, "fp32", device, checkpoint=checkpoint)
