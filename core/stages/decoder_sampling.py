"""Decoder sampling: flow-matching Euler with classifier-free guidance, for GLM-Image and CogView4.

Latents, the guidance combination and the Euler step are fp32 whatever the DiT's dtype. The initial noise is
drawn on the CPU in fp32 from the seed, so a seed gives the same image on every device.

CFG runs both branches in one batched forward unless there is a reference cache (the conditional branch reads
it, the unconditional one does not). Text streams of different lengths are left-padded to the longer one and
each sample attends over its real keys only, so the padding changes nothing.

One loop (``denoise``) serves both DiTs; each contributes its conditioning (``ModelConditioning``). The run's
settings are one checked ``settings.DecoderRun``. Speed options: ``options.compile`` runs the DiT blocks through
a regional ``torch.compile``; ``settings.step_cache`` > 0 turns on the first-block step cache
(``models.step_cache``: approximate, off by default).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..host.progress import Progress
from ..models.step_cache import StepCache
from ..runtime import checks
from ..runtime.devices import compute_device
from ..runtime.geometry import check_latent_size, patch_count
from ..runtime.options import RunOptions, resolved
from .flow_schedule import FlowSchedule, ShiftSettings, cogview4_schedule, glm_image_schedule
from .handles import GlyphConditioning, ReferenceImages
from .settings import DecoderRun

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Preview = Callable[[torch.Tensor], object]   # denoised estimate [B, C, h, w] -> a PIL image for the progress bar


def initial_noise(shape: tuple[int, ...], seed: int, noise: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}.")
        return noise.to(device=device, dtype=torch.float32)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


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


class ModelConditioning:
    """What one DiT contributes to the sampling loop: its batch, schedule and name, and its forward for a
    branch: ``cond``, ``uncond`` or ``both`` (the CFG pair batched in one forward, conditional first)."""
    name: str
    batch: int
    device: torch.device  # where the loop computes (the caller's compute device; the weights may be elsewhere)
    batched: bool        # whether CFG runs as one ``both`` forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, branch: str, step_cache, options: RunOptions) -> torch.Tensor:
        raise NotImplementedError

    def schedule(self, steps: int, height: int, width: int, shift: ShiftSettings | None) -> FlowSchedule:
        raise NotImplementedError


@torch.no_grad()
def denoise(dit, conditioning: ModelConditioning, height: int, width: int, settings: DecoderRun, *,
            noise: torch.Tensor | None = None, start_latents: torch.Tensor | None = None,
            start_sigma: float | None = None, progress: bool = True, preview: Preview | None = None,
            options: RunOptions | None = None) -> torch.Tensor:
    """The loop both DiTs share: latents ``[B, 16, H/8, W/8]`` (fp32) from the seed's noise (or ``noise``),
    Euler over the model's schedule with CFG (``settings.guidance`` > 1) and the step cache.
    start_latents + start_sigma: refine a latent from that noise level instead of starting from pure noise.
    preview: turns each step's denoised estimate into a live preview (``latent_preview.decoder_preview``).
    options: attention kernel, kernel mode and regional compile of the DiT blocks."""
    options = resolved(options)
    steps_cache = StepCache(settings.step_cache)
    b = conditioning.batch
    schedule = conditioning.schedule(settings.steps, height, width, settings.shift_settings)
    noise = initial_noise((b, dit.config.in_channels, height // 8, width // 8), settings.seed, noise,
                          conditioning.device)
    x, schedule = start_point(noise, schedule, start_latents, start_sigma)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if settings.cfg and conditioning.batched:
            both = conditioning.forward(torch.cat([x, x]), t.expand(2 * b), "both", steps_cache.branch("cfg"),
                                        options).float()
            return guide(*both.chunk(2), settings.guidance)
        c = conditioning.forward(x, t.expand(b), "cond", steps_cache.branch("cond"), options).float()
        if not settings.cfg:
            return c
        u = conditioning.forward(x, t.expand(b), "uncond", steps_cache.branch("uncond"), options).float()
        return guide(c, u, settings.guidance)

    return euler(x, schedule, velocity, progress, conditioning.name, dit.dtype, preview)


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
def write_reference_cache(dit, references: ReferenceImages, options: RunOptions | None = None,
                          device: torch.device | None = None):
    """One DiT pass per reference (timestep 0, empty glyph stream, its own size and prior ids) storing its K/V,
    computed on ``device`` (None: where the weights are)."""
    device = compute_device(device, dit.device)
    cache = dit.new_kv_cache()
    glyph_dim = dit.config.text_embed_dim
    for i, (latents, ids) in enumerate(zip(references.latents, references.prior_ids)):
        latents = latents.to(device=device, dtype=dit.dtype)
        if latents.dim() == 3:
            latents = latents[None]
        h, w = latents.shape[-2:]
        grid = (h // dit.patch_size) * (w // dit.patch_size)
        ids = ids.reshape(1, -1).to(device)
        if ids.shape[1] != grid:
            raise ValueError(f"Reference {i}: {ids.shape[1]} prior ids for a latent of {h}x{w} ({grid} patches). "
                             f"Reference sides must be multiples of 32 so the token grid and the latent agree.")
        check_ids(ids, dit.codebook_size, f"reference {i}")
        dit(latents, latents.new_zeros(1, 0, glyph_dim), ids, False, torch.zeros(1, device=device),
            torch.tensor([[h * 8, w * 8]], dtype=torch.float32, device=device),
            torch.zeros(1, 2, device=device), kv_cache=cache, kv_mode="write", options=options)
    return cache


def check_ids(ids: torch.Tensor, codebook_size: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise ValueError(f"The {what} token ids must lie in [0, {codebook_size}) but range over "
                         f"[{int(ids.min())}, {int(ids.max())}]; the AR output probably holds a special token.")


class GlmImageConditioning(ModelConditioning):
    """GLM-Image: 2x-upsampled prior ids and glyph embeddings; the unconditional branch has the glyph of "" and
    the prior dropped. With references their K/V are computed once (before the loop) and read by every
    conditional pass, which then runs apart from the unconditional one."""
    name = "GLM-Image decoder"

    def __init__(self, dit, prior_ids: torch.Tensor, glyph: GlyphConditioning, height: int, width: int,
                 cfg: bool, references: ReferenceImages | None, options: RunOptions, device: torch.device):
        self.device = device
        prior_ids = (prior_ids[None] if prior_ids.dim() == 1 else prior_ids).to(device)
        b = self.batch = prior_ids.shape[0]
        checks.check_count(b, "the number of images (token grids)", checks.MAX_BATCH)
        grid = patch_count(height, width)
        if prior_ids.shape[1] != grid:
            raise ValueError(f"{prior_ids.shape[1]} prior ids per image but {height}x{width} needs {grid} "
                             f"((H/16)*(W/16), the 2x-upsampled token grid).")
        check_ids(prior_ids, dit.codebook_size, "prior")
        self.dit, self.ids = dit, prior_ids
        self.cond = batch_of(glyph.cond, b, "glyph.cond").to(device=device, dtype=dit.dtype)
        self.uncond = batch_of(glyph.uncond, b, "glyph.uncond").to(device=device, dtype=dit.dtype)
        self.cache = write_reference_cache(dit, references, options, device) \
            if references is not None and references.latents else None
        self.size = torch.tensor([[height, width]], dtype=torch.float32, device=device).expand(b, 2)
        self.crop = torch.zeros(b, 2, device=device)
        self.batched = cfg and self.cache is None
        if self.batched:
            self.both_glyph, self.text_pad = left_pad([self.cond, self.uncond])
            self.both_ids, self.both_drop = torch.cat([prior_ids, prior_ids]), torch.arange(2 * b, device=device) >= b
            self.both_size, self.both_crop = torch.cat([self.size, self.size]), torch.cat([self.crop, self.crop])

    def forward(self, x, t, branch, step_cache, options):
        if branch == "both":
            return self.dit(x, self.both_glyph, self.both_ids, self.both_drop, t, self.both_size, self.both_crop,
                            text_pad=self.text_pad, step_cache=step_cache, options=options)
        uncond = branch == "uncond"
        return self.dit(x, self.uncond if uncond else self.cond, self.ids, uncond, t, self.size, self.crop,
                        kv_cache=self.cache, kv_mode="skip" if uncond else "read", step_cache=step_cache,
                        options=options)

    def schedule(self, steps: int, height: int, width: int, shift: ShiftSettings | None) -> FlowSchedule:
        return glm_image_schedule(steps, height, width, shift)


@torch.no_grad()
def sample_latents(dit, prior_ids: torch.Tensor, glyph: GlyphConditioning, height: int, width: int,
                   settings: DecoderRun = DecoderRun(), *, references: ReferenceImages | None = None,
                   noise: torch.Tensor | None = None, start_latents: torch.Tensor | None = None,
                   start_sigma: float | None = None, progress: bool = True, preview: Preview | None = None,
                   options: RunOptions | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Denoise GLM-Image latents ``[B, 16, H/8, W/8]`` (fp32, normalized: the VAE de-normalizes them with
    latents_mean/std) from 2x-upsampled prior ids ``[B, (H/16)(W/16)]`` and glyph conditioning.

    settings: steps, guidance (> 1 adds the unconditional branch: glyph of "", prior dropped, references not
    read), seed, step cache and the release's scheduler settings (``flow_schedule.release_shift_settings``).
    references: editing; their K/V are computed once before the loop and read by every conditional pass.
    noise, start_latents + start_sigma, progress, preview, options: see ``denoise``.
    device: the compute device (``host.memory.on_compute_device`` yields it; None: where the weights are).
    """
    check_latent_size(height, width)
    options = resolved(options)
    conditioning = GlmImageConditioning(dit, prior_ids, glyph, height, width, settings.cfg, references, options,
                                        compute_device(device, dit.device))
    return denoise(dit, conditioning, height, width, settings, noise=noise, start_latents=start_latents,
                   start_sigma=start_sigma, progress=progress, preview=preview, options=options)

# ---- CogView4 --------------------------------------------------------------------------------------------------
class CogView4Conditioning(ModelConditioning):
    """CogView4: GLM-4 prompt embeddings ``[B, L, 4096]`` (the negative prompt's may have another length);
    original_size = target_size = (H, W), crop (0, 0). CFG always runs batched."""
    name = "CogView4 decoder"
    batched = True

    def __init__(self, dit, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor | None, height: int, width: int,
                 cfg: bool, device: torch.device):
        self.device = device
        b = self.batch = cond_embeds.shape[0]
        checks.check_count(b, "num_images")
        if cfg and uncond_embeds is None:
            raise ValueError("guidance > 1 needs uncond_embeds (the encoding of the negative prompt, \"\" by default).")
        self.dit = dit
        self.cond = cond_embeds.to(device=device, dtype=dit.dtype)
        self.size = torch.tensor([[height, width]], dtype=torch.float32, device=device).expand(b, 2)
        self.crop = torch.zeros(b, 2, device=device)
        if cfg:
            uncond = batch_of(uncond_embeds, b, "uncond_embeds").to(device=device, dtype=dit.dtype)
            self.both_text, self.text_pad = left_pad([self.cond, uncond])
            self.both_size, self.both_crop = torch.cat([self.size, self.size]), torch.cat([self.crop, self.crop])

    def forward(self, x, t, branch, step_cache, options):
        if branch == "both":
            return self.dit(x, self.both_text, t, self.both_size, self.both_size, self.both_crop,
                            text_pad=self.text_pad, step_cache=step_cache, options=options)
        return self.dit(x, self.cond, t, self.size, self.size, self.crop, step_cache=step_cache, options=options)

    def schedule(self, steps: int, height: int, width: int, shift: ShiftSettings | None) -> FlowSchedule:
        return cogview4_schedule(steps, height, width, shift)


@torch.no_grad()
def sample_cogview4_latents(dit, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor | None, height: int,
                            width: int, settings: DecoderRun = DecoderRun(guidance=5.0), *,
                            noise: torch.Tensor | None = None, start_latents: torch.Tensor | None = None,
                            start_sigma: float | None = None, progress: bool = True, preview: Preview | None = None,
                            options: RunOptions | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Denoise CogView4 latents ``[B, 16, H/8, W/8]`` (fp32, CogView4's space: scaling 1.0, no mean/std) from
    GLM-4 prompt embeddings ``[B, L, 4096]`` (``uncond_embeds`` unused when guidance <= 1).
    noise, start_latents + start_sigma, progress, preview, options: see ``denoise``; device: see
    ``sample_latents``."""
    check_latent_size(height, width)
    conditioning = CogView4Conditioning(dit, cond_embeds, uncond_embeds, height, width, settings.cfg,
                                        compute_device(device, dit.device))
    return denoise(dit, conditioning, height, width, settings, noise=noise, start_latents=start_latents,
                   start_sigma=start_sigma, progress=progress, preview=preview, options=options)

