"""2x upscaling by re-decoding with GLM-Image, and SDEdit-style refine passes (GLM-Image and CogView4).

GLM-Image's decoder is trained on the semantic tokens of its target seen at half size, so for a 2x output the
token grid is the input's own: tokenize the input for the output size, decode at the output size with the input as
a reference image (the DiT reads its K/V). This keeps the meaning of the image, not its exact pixels.

Refine (``strength`` < 1): VAE-encode a bicubic upsample, noise it to sigma = strength (flow matching: sigma is
the noise level) and denoise only the rest of the schedule. strength 1 decodes from pure noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..host.progress import Progress
from ..models.semantic_tokenizer import SemanticTokenizer, tokenize_image
from ..models.vae import GlmVAE
from ..runtime import checks
from ..runtime.geometry import LARGE_ALTERNATIVE, MAX_SIDE, check_cogview4_size, scaled_size, upscale_2x_size
from ..runtime.images import to_rgb01
from .decoder_sampling import sample_cogview4_latents, sample_latents
from .flow_schedule import ShiftSettings
from .handles import GlyphConditioning, upsample_ids
from .references import prepare_references
from .settings import DecoderRun

MAX_REFINE_SCALE = 2.0


def check_strength(strength: float) -> None:
    checks.check_float(strength, "strength", 0.0, 1.0, low_open=True,
                       fix="Use a strength in (0, 1]: 1 decodes from pure noise, lower keeps more of the image.")


def check_refine_scale(scale: float) -> None:
    checks.check_float(scale, "scale", 1.0, MAX_REFINE_SCALE,
                       fix=f"Use a scale of 1.0..{MAX_REFINE_SCALE:g} (output size over input size).")


def upsample(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of ``[H, W, 3]`` 0..1 to ``height`` x ``width`` (clamped to 0..1)."""
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def refine_start(image: torch.Tensor, vae: GlmVAE, height: int, width: int, strength: float,
                 device: torch.device | None = None) -> dict:
    """``start_latents``/``start_sigma`` for the samplers: the VAE latent of the bicubic upsample, or nothing
    (pure noise) at strength 1."""
    if strength >= 1:
        return {}
    latents = vae.encode(upsample(image, height, width)[None], device=device).float()
    return {"start_latents": latents, "start_sigma": float(strength)}


def upscale_2x(image, *, decoder, vae: GlmVAE, tokenizer: SemanticTokenizer, glyph: GlyphConditioning,
               steps: int = 30, guidance: float = 1.5, seed: int = 0, strength: float = 1.0,
               use_reference: bool = True, shift_settings: ShiftSettings | None = None,
               preview=None, device: torch.device | None = None) -> torch.Tensor:
    """Upscale one image ``[H, W, 3]`` 0..1 to ``[2H', 2W', 3]`` (H', W': the input rounded to multiples of 16)
    by re-decoding its semantic tokens at twice the size with the GLM-Image decoder.

    use_reference: the input is also a reference image (its K/V computed once), so the decoder can copy detail.
    strength < 1: refine the bicubic upsample from that noise level instead of decoding from pure noise.
    glyph: the glyph-text conditioning (the encoding of "" when the image has no text to render).
    preview: live previews of the decoder (``latent_preview.decoder_preview``).
    device: the compute device of the three models (None: where their weights are).
    """
    image = to_rgb01(image)
    height, width = upscale_2x_size(*image.shape[:2])
    check_strength(strength)
    settings = DecoderRun(seed=seed, steps=steps, guidance=guidance, shift_settings=shift_settings)
    ids = tokenize_image(tokenizer, image, height, width, device=device)
    prior_ids = upsample_ids(ids)[None]
    references = prepare_references([image], vae, tokenizer, device=device)[0] if use_reference else None
    latents = sample_latents(decoder, prior_ids, glyph, height, width, settings=settings, references=references,
                             preview=preview, device=device, **refine_start(image, vae, height, width, strength,
                                                                            device))
    return vae.decode(latents, progress=Progress, device=device)[0]


def refine_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The CogView4 refine output size of a ``height`` x ``width`` image, or a ValueError saying why not."""
    check_refine_scale(scale)
    out_h, out_w = scaled_size(height, width, scale)
    try:
        check_cogview4_size(out_h, out_w)
    except ValueError as e:
        hint = f" For larger images: {LARGE_ALTERNATIVE}." if max(out_h, out_w) > MAX_SIDE else ""
        raise ValueError(f"Refining {height}x{width} (HxW) at scale {scale:g}: {e}{hint}") from e
    return out_h, out_w


def refine_cogview4(image, *, decoder, vae: GlmVAE, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor,
                    scale: float = 2.0, steps: int = 30, guidance: float = 5.0, seed: int = 0,
                    strength: float = 0.5, shift_settings: ShiftSettings | None = None,
                    preview=None, device: torch.device | None = None) -> torch.Tensor:
    """Refine one image ``[H, W, 3]`` 0..1 with CogView4 at ``scale`` times its size (rounded to multiples of 32):
    bicubic upsample, VAE encode, noise to sigma = strength, denoise the rest with the prompt embeddings
    ``[1, L, 4096]``. Returns ``[H_out, W_out, 3]``; ``vae`` is CogView4's. ``device``: the compute device of
    both models (None: where their weights are)."""
    image = to_rgb01(image)
    height, width = refine_size(image.shape[0], image.shape[1], scale)
    check_strength(strength)
    settings = DecoderRun(seed=seed, steps=steps, guidance=guidance, shift_settings=shift_settings)
    latents = sample_cogview4_latents(decoder, cond_embeds, uncond_embeds, height, width, settings=settings,
                                      preview=preview, device=device,
                                      **refine_start(image, vae, height, width, strength, device))
    return vae.decode(latents, progress=Progress, device=device)[0]
