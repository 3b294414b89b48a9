"""Live previews of the decoder: a linear latent-to-RGB map fitted from the VAE itself.

ComfyUI's ``latent2rgb`` previewer multiplies each latent pixel by a model's published factors; none exist for
the 16-channel VAE of GLM-Image and CogView4, so they are fitted from the loaded VAE, once per VAE file: decode a
few small random latents, average the decoded pixels over each 8x8 cell and solve least squares
``cell_rgb = latent @ weights + bias`` (RGB in -1..1, in the *normalized* latent space the decoders work in).
The random latents have regions (noise upsampled from 1/4 of the side, plus a little fine noise), like the
decoder's denoised estimates; white noise would make each cell's colour depend mostly on its neighbours.

Which VAE previews a decoder comes from the workflow: the samplers' optional ``vae`` input. Without it the
documented per-handle default is the VAE of the decoder's own release (``vae/`` beside the decoder's component,
as ``scheduler/`` is found), read once per release for the fit; a decoder from a single file outside a release
previews only with the input connected. Nothing depends on which VAE was loaded last.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..formats.reading import release_roots
from ..host import memory, progress
from ..models.vae import load_vae
from ..runtime.devices import offload_device
from ..runtime.geometry import PREVIEW_FIT_COARSE, PREVIEW_FIT_LATENT_SIDE

log = logging.getLogger("glm_image_nodes")

FIT_LATENTS = 4        # 4 latents of 32x32: 4096 cells for 17 unknowns per colour
FINE_NOISE = 0.3       # weight of the per-pixel noise on top of the regions


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ weights + bias``: weights ``[C, 3]``, bias ``[3]``, RGB in -1..1 (ComfyUI's
    ``latent_rgb_factors`` and ``latent_rgb_factors_bias``)."""
    weights: torch.Tensor
    bias: torch.Tensor

    def rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """One latent ``[C, h, w]`` -> ``[h, w, 3]`` float32 in -1..1 (not clamped), on the latent's device."""
        x = latent.float().movedim(0, -1)
        return F.linear(x, self.weights.to(x.device).T, self.bias.to(x.device))

    def image(self, latent: torch.Tensor) -> Image.Image:
        """One latent ``[C, h, w]`` -> an ``h`` x ``w`` PIL image, as ComfyUI's ``preview_to_image`` makes it."""
        pixels = ((self.rgb(latent) + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(pixels))


def fitting_latents(channels: int, count: int = FIT_LATENTS, side: int = PREVIEW_FIT_LATENT_SIDE,
                    seed: int = 0) -> torch.Tensor:
    """``[count, channels, side, side]`` random latents with regions, each channel of unit variance."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, channels, side // PREVIEW_FIT_COARSE, side // PREVIEW_FIT_COARSE, generator=generator)
    z = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    z = z + FINE_NOISE * torch.randn(count, channels, side, side, generator=generator)
    return (z - z.mean((2, 3), keepdim=True)) / z.std((2, 3), keepdim=True)


def cell_colours(vae, latents: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The real decode (on ``device``; None: where the weights are) of normalized ``latents`` ``[B, C, h, w]``
    averaged over each latent pixel's cell: ``[B, 3, h, w]`` in -1..1."""
    images = vae.decode(latents, tiled=False, device=device) * 2 - 1           # [B, H, W, 3], float32, CPU
    return F.avg_pool2d(images.permute(0, 3, 1, 2), vae.downscale)


def fit_latent_rgb(vae, latents: torch.Tensor | None = None, device: torch.device | None = None) -> LatentRGB:
    """Least-squares latent-to-RGB map of ``vae`` (a ``GlmVAE``) from the decode of ``latents`` (default
    ``fitting_latents``) on ``device`` (None: where the weights are)."""
    channels = vae.model.config.latent_channels
    if latents is None:
        latents = fitting_latents(channels)
    targets = cell_colours(vae, latents, device).permute(0, 2, 3, 1).reshape(-1, 3).double()
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution.float()
    return LatentRGB(weights=solution[:channels].contiguous(), bias=solution[channels].contiguous())


# ---- one fit per VAE file ---------------------------------------------------------------------------------------
_fitted: dict[str, LatentRGB] = {}


def fingerprint(vae) -> str:
    """Identifies the VAE's weights (and so its file) across loads: its config and its decoder's first and last
    convolutions, hashed in float32."""
    decoder = vae.model.decoder
    digest = hashlib.sha1(repr(vae.model.config).encode())
    for tensor in (decoder.conv_in.weight, decoder.conv_out.weight, decoder.conv_out.bias):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def latent_rgb_for(vae) -> LatentRGB:
    """The fitted map of ``vae``, computed once per VAE file; the fit decodes on the compute device."""
    key = fingerprint(vae)
    if key not in _fitted:
        with memory.on_compute_device(vae.model, stage="fitting the preview colours",
                                     advice="set ComfyUI's --preview-method to none") as device:
            _fitted[key] = fit_latent_rgb(vae, device=device)
    return _fitted[key]


# ---- which VAE previews a decoder -------------------------------------------------------------------------------
GLM_IMAGE, COGVIEW4 = "glm_image", "cogview4"
_release_fits: dict[str, tuple[str, LatentRGB]] = {}  # vae/ folder -> (its latent family, its fit)
_warned: set[str] = set()


def latent_family(vae) -> str:
    """GLM-Image's latents are normalized per channel (mean/std), CogView4's by scaling and shift only."""
    return GLM_IMAGE if vae.latents_mean is not None else COGVIEW4


def release_vae_folder(path: str | None) -> str | None:
    """The ``vae/`` folder of the release the component at ``path`` (release root, component folder or file)
    belongs to: there or one folder up; None outside a release."""
    if not path:
        return None
    for root in release_roots(path):
        vae = os.path.join(root, "vae")
        if os.path.isfile(os.path.join(vae, "config.json")):
            return vae
    return None


def release_latent_rgb(path: str | None, family: str) -> LatentRGB | None:
    """The per-handle default: the fit of the VAE in the release of the decoder at ``path`` (read once per
    release folder and not kept), if it is a VAE of ``family``."""
    folder = release_vae_folder(path)
    if folder is None:
        return None
    if folder not in _release_fits:
        vae = load_vae(folder, dtype="fp32", device=offload_device())
        _release_fits[folder] = (latent_family(vae), latent_rgb_for(vae))
    vae_family, factors = _release_fits[folder]
    return factors if vae_family == family else None


class LatentPreview:
    """Turns the decoder's denoised estimate ``[B, C, h, w]`` into a PIL image of its first sample."""

    def __init__(self, factors: LatentRGB):
        self.factors = factors

    def __call__(self, denoised: torch.Tensor) -> Image.Image:
        return self.factors.image(denoised[0])


def decoder_preview(family: str, vae=None, release: str | None = None) -> LatentPreview | None:
    """The previewer for a decoder of latent ``family``, or None when previews are off (``--preview-method
    none``) or there is no VAE to fit. ``vae``: the VAE the workflow gives the node; else the VAE of the
    decoder's ``release`` (the decoder handle's path)."""
    method = progress.preview_method()
    if method == "none":
        return None
    if method == "taesd" and "taesd" not in _warned:
        _warned.add("taesd")
        log.warning("GLM-Image previews: there is no TAESD for the GLM-Image/CogView4 VAE; using latent2rgb.")
    factors = latent_rgb_for(vae) if vae is not None else release_latent_rgb(release, family)
    if factors is None:
        if family not in _warned:
            _warned.add(family)
            log.warning("GLM-Image previews: the %s decoder is not in a release folder with a vae/, so there is "
                        "no decoder preview; connect the sampler's vae input for previews.", family)
        return None
    return LatentPreview(factors)
