"""Decoder sampling: flow-matching Euler with classifier-free guidance, for GLM-Image and CogView4.

Latents, the guidance combination and the Euler step are fp32 whatever the DiT's dtype. The initial noise is
drawn on the CPU in fp32 from the seed, so a seed gives the same image on every device.

CFG runs both branches in one batched forward unless there is a reference cache (the conditional branch reads
it, the unconditional one does not). Text streams of different lengths are left-padded to the longer one and
each sample attends over its real keys only, so the padding changes nothing.

Speed options: ``compile_blocks`` runs the DiT blocks through a regional ``torch.compile``; ``step_cache`` > 0
turns on the first-block step cache (``models.step_cache``: approximate, off by default).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..host.progress import Progress
from ..models.dit import compiled_blocks
from ..models.step_cache import StepCache
from ..runtime import checks
from ..runtime.geometry import check_latent_size, patch_count
from .flow_schedule import FlowSchedule, ShiftSettings, cogview4_schedule, glm_image_schedule
from .handles import GlyphConditioning, ReferenceImages

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Preview = Callable[[torch.Tensor], object]   # denoised estimate [B, C, h, w] -> a PIL image for the progress bar


def initial_noise(shape: tuple[int, ...], seed: int, noise: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}.")
        return noise.to(device=device, dtype=torch.float32)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def check_sampler_settings(steps: int, guidance: float, seed: int) -> None:
    """The decoders' settings (the nodes' VALIDATE_INPUTS call this too)."""
    checks.check_steps(steps)
    checks.check_guidance(guidance)
    checks.check_seed(seed)


def batch_of(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]} but the sampling batch is {batch}.")


def start_point(noise: torch.Tensor, schedule: FlowSchedule, start_latents: torch.Tensor | None,
                start_sigma: float | None) -> tuple[torch.Tensor, FlowSchedule]:
    """Pure noise, or for a refine pass ``(1 - s) * start + s * noise`` at the first scheduled sigma <= start."""
    if (start_latents is None) != (start_sigma is None):
        raise ValueError("start_latents and start_sigma go together (refine from a latent at a noise level).")
    if start_latents is None:
        return noise, schedule
    schedule = schedule.starting_at(float(start_sigma))
    if tuple(start_latents.shape) != tuple(noise.shape):
        raise ValueError(f"start_latents has shape {tuple(start_latents.shape)}, expected {tuple(noise.shape)}.")
    s = schedule.sigmas[0].to(noise.device)
    return (1 - s) * start_latents.to(noise) + s * noise, schedule


def left_pad(streams: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Text streams ``[b, L_i, D]`` concatenated along the batch, left-padded with zeros to the longest, and
    the padding of each sample (None when every length agrees)."""
    longest = max(s.shape[1] for s in streams)
    pads = tuple(longest - s.shape[1] for s in streams for _ in range(s.shape[0]))
    if not any(pads):
        return torch.cat(streams), None
    return torch.cat([F.pad(s, (0, 0, longest - s.shape[1], 0)) for s in streams]), pads


def guide(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    return uncond + guidance * (cond - uncond)


def euler(x: torch.Tensor, schedule: FlowSchedule, velocity: Velocity, progress: bool, desc: str,
          dtype: torch.dtype, preview: Preview | None = None) -> torch.Tensor:
    """``x += (sigma[i+1] - sigma[i]) * velocity(x, model_timestep[i])`` in fp32; reports progress per step
    (which also raises on the user's interrupt), with ``preview`` of the denoised estimate ``x - sigma * v``.
    Raises NonFiniteOutput when the result holds NaN or inf (``dtype``: the DiT's, for the likely cause)."""
    sigmas = schedule.sigmas.to(x.device)
    timesteps = schedule.model_timesteps.to(x.device)
    with Progress(len(schedule), desc, enabled=progress) as bar:
        for i in range(len(schedule)):
            v = velocity(x, timesteps[i])
            image = preview(x - sigmas[i] * v) if preview is not None else None
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            bar.update(preview=image)
    return checks.check_finite_output(x, f"{desc} sampling ({len(schedule)} steps)", dtype)


# ---- GLM-Image -------------------------------------------------------------------------------------------------
def write_reference_cache(dit, references: ReferenceImages):
    """One DiT pass per reference (timestep 0, empty glyph stream, its own size and prior ids) storing its K/V."""
    cache = dit.new_kv_cache()
    glyph_dim = dit.config.text_embed_dim
    for i, (latents, ids) in enumerate(zip(references.latents, references.prior_ids)):
        latents = latents.to(device=dit.device, dtype=dit.dtype)
        if latents.dim() == 3:
            latents = latents[None]
        h, w = latents.shape[-2:]
        grid = (h // dit.patch_size) * (w // dit.patch_size)
        ids = ids.reshape(1, -1).to(dit.device)
        if ids.shape[1] != grid:
            raise ValueError(f"Reference {i}: {ids.shape[1]} prior ids for a latent of {h}x{w} ({grid} patches). "
                             f"Reference sides must be multiples of 32 so the token grid and the latent agree.")
        check_ids(ids, dit.codebook_size, f"reference {i}")
        dit(latents, latents.new_zeros(1, 0, glyph_dim), ids, False, torch.zeros(1, device=dit.device),
            torch.tensor([[h * 8, w * 8]], dtype=torch.float32, device=dit.device),
            torch.zeros(1, 2, device=dit.device), kv_cache=cache, kv_mode="write")
    return cache


def check_ids(ids: torch.Tensor, codebook_size: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise ValueError(f"The {what} token ids must lie in [0, {codebook_size}) but range over "
                         f"[{int(ids.min())}, {int(ids.max())}]; the AR output probably holds a special token.")


@torch.no_grad()
def sample_latents(dit, prior_ids: torch.Tensor, glyph: GlyphConditioning, height: int, width: int, *,
                   steps: int = 50, guidance: float = 1.5, seed: int = 0, noise: torch.Tensor | None = None,
                   references: ReferenceImages | None = None, start_latents: torch.Tensor | None = None,
                   start_sigma: float | None = None, shift_settings: ShiftSettings | None = None,
                   progress: bool = True, preview: Preview | None = None, compile_blocks: bool = False,
                   step_cache: float = 0.0) -> torch.Tensor:
    """Denoise GLM-Image latents ``[B, 16, H/8, W/8]`` (fp32, normalized: the VAE de-normalizes them with
    latents_mean/std) from 2x-upsampled prior ids ``[B, (H/16)(W/16)]`` and glyph conditioning.

    guidance > 1 adds the unconditional branch (glyph of "", prior dropped, references not read).
    references: editing; their K/V are computed once before the loop and read by every conditional pass.
    start_latents + start_sigma: refine a latent from that noise level instead of starting from pure noise.
    shift_settings: the release's scheduler settings (``flow_schedule.release_shift_settings``; default: the
    release's values).
    preview: turns each step's denoised estimate into a live preview (``latent_preview.decoder_preview``).
    compile_blocks, step_cache: the speed options of the module docstring.
    """
    check_latent_size(height, width)
    check_sampler_settings(steps, guidance, seed)
    steps_cache = StepCache(step_cache)
    device = dit.device
    if prior_ids.dim() == 1:
        prior_ids = prior_ids[None]
    prior_ids = prior_ids.to(device)
    b = prior_ids.shape[0]
    checks.check_count(b, "the number of images (token grids)", checks.MAX_BATCH)
    grid = patch_count(height, width)
    if prior_ids.shape[1] != grid:
        raise ValueError(f"{prior_ids.shape[1]} prior ids per image but {height}x{width} needs {grid} "
                         f"((H/16)*(W/16), the 2x-upsampled token grid).")
    check_ids(prior_ids, dit.codebook_size, "prior")

    schedule = glm_image_schedule(steps, height, width, shift_settings)
    noise = initial_noise((b, dit.config.in_channels, height // 8, width // 8), seed, noise, device)
    x, schedule = start_point(noise, schedule, start_latents, start_sigma)

    cond = batch_of(glyph.cond, b, "glyph.cond").to(device=device, dtype=dit.dtype)
    uncond = batch_of(glyph.uncond, b, "glyph.uncond").to(device=device, dtype=dit.dtype)
    cache = write_reference_cache(dit, references) if references is not None and references.latents else None
    size = torch.tensor([[height, width]], dtype=torch.float32, device=device).expand(b, 2)
    crop = torch.zeros(b, 2, device=device)
    use_cfg = guidance > 1
    batched = use_cfg and cache is None
    if batched:
        (both_glyph, text_pad), both_ids = left_pad([cond, uncond]), torch.cat([prior_ids, prior_ids])
        both_drop = torch.arange(2 * b, device=device) >= b
        both_size, both_crop = torch.cat([size, size]), torch.cat([crop, crop])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if batched:
            both = dit(torch.cat([x, x]), both_glyph, both_ids, both_drop, t.expand(2 * b), both_size,
                       both_crop, text_pad=text_pad, step_cache=steps_cache.branch("cfg")).float()
            return guide(*both.chunk(2), guidance)
        c = dit(x, cond, prior_ids, False, t.expand(b), size, crop, kv_cache=cache, kv_mode="read",
                step_cache=steps_cache.branch("cond")).float()
        if not use_cfg:
            return c
        u = dit(x, uncond, prior_ids, True, t.expand(b), size, crop, kv_cache=cache, kv_mode="skip",
                step_cache=steps_cache.branch("uncond")).float()
        return guide(c, u, guidance)

    with compiled_blocks(dit, compile_blocks):
        return euler(x, schedule, velocity, progress, "GLM-Image decoder", dit.dtype, preview)


# ---- CogView4 --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_cogview4_latents(dit, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor | None, height: int,
                            width: int, *, steps: int = 50, guidance: float = 5.0, seed: int = 0,
                            noise: torch.Tensor | None = None, start_latents: torch.Tensor | None = None,
                            start_sigma: float | None = None, shift_settings: ShiftSettings | None = None,
                            progress: bool = True, preview: Preview | None = None, compile_blocks: bool = False,
                            step_cache: float = 0.0) -> torch.Tensor:
    """Denoise CogView4 latents ``[B, 16, H/8, W/8]`` (fp32, CogView4's space: scaling 1.0, no mean/std) from
    GLM-4 prompt embeddings ``[B, L, 4096]`` (``uncond_embeds`` may have another length; unused when
    guidance <= 1). original_size = target_size = (H, W), crop (0, 0).
    start_latents + start_sigma: refine a latent from that noise level instead of starting from pure noise.
    preview: turns each step's denoised estimate into a live preview.
    compile_blocks, step_cache: the speed options of the module docstring."""
    check_latent_size(height, width)
    check_sampler_settings(steps, guidance, seed)
    steps_cache = StepCache(step_cache)
    device = dit.device
    b = cond_embeds.shape[0]
    checks.check_count(b, "num_images")
    use_cfg = guidance > 1
    if use_cfg and uncond_embeds is None:
        raise ValueError("guidance > 1 needs uncond_embeds (the encoding of the negative prompt, \"\" by default).")
    schedule = cogview4_schedule(steps, height, width, shift_settings)
    noise = initial_noise((b, dit.config.in_channels, height // 8, width // 8), seed, noise, device)
    x, schedule = start_point(noise, schedule, start_latents, start_sigma)
    cond = cond_embeds.to(device=device, dtype=dit.dtype)
    uncond = batch_of(uncond_embeds, b, "uncond_embeds").to(device=device, dtype=dit.dtype) if use_cfg else None
    size = torch.tensor([[height, width]], dtype=torch.float32, device=device).expand(b, 2)
    crop = torch.zeros(b, 2, device=device)
    if use_cfg:
        both_text, text_pad = left_pad([cond, uncond])
        sizes, crops = torch.cat([size, size]), torch.cat([crop, crop])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if use_cfg:
            both = dit(torch.cat([x, x]), both_text, t.expand(2 * b), sizes, sizes, crops, text_pad=text_pad,
                       step_cache=steps_cache.branch("cfg")).float()
            return guide(*both.chunk(2), guidance)
        return dit(x, cond, t.expand(b), size, size, crop, step_cache=steps_cache.branch("cond")).float()

    with compiled_blocks(dit, compile_blocks):
        return euler(x, schedule, velocity, progress, "CogView4 decoder", dit.dtype, preview)
