"""Flow-matching schedules of GLM-Image and CogView4 (diffusers <= 0.39 / 0.42 behaviour).

The DiT is conditioned on the *unshifted* integer timesteps, while the Euler step uses the resolution-shifted
sigmas. diffusers 0.40 and 0.41 condition on the shifted values instead, which gives magenta, grainy images.
Everything is computed the way the reference does (float64 linspace truncated to int, then float32), so the
sigmas equal the reference scheduler's bit for bit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..formats.reading import CheckpointError, read_json, release_roots


@dataclass(frozen=True)
class ShiftSettings:
    """The fields of ``scheduler/scheduler_config.json`` the schedule uses (defaults: the real release's)."""
    num_train_timesteps: int = 1000
    base_shift: float = 0.25
    max_shift: float = 0.75
    base_image_seq_len: int = 256
    time_shift_type: str = "linear"

    def mu(self, image_seq_len: int) -> float:
        return (image_seq_len / self.base_image_seq_len) ** 0.5 * self.max_shift + self.base_shift


def read_shift_settings(path: str | None) -> ShiftSettings:
    """Settings from a release root, its ``scheduler/`` folder or the json file itself; defaults for None."""
    if path is None:
        return ShiftSettings()
    if os.path.isdir(os.path.join(path, "scheduler")):
        path = os.path.join(path, "scheduler")
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    config = read_json(path)
    if not config.get("use_dynamic_shifting", True):
        raise CheckpointError(f"{path}: use_dynamic_shifting is false, but GLM-Image and CogView4 shift the "
                              f"schedule by resolution. Use the release's own scheduler_config.json.")
    shift_type = config.get("time_shift_type", "exponential")
    if shift_type not in ("linear", "exponential"):
        raise CheckpointError(f"{path}: unknown time_shift_type {shift_type!r} (expected 'linear').")
    defaults = ShiftSettings()
    return ShiftSettings(
        num_train_timesteps=int(config.get("num_train_timesteps", defaults.num_train_timesteps)),
        base_shift=float(config.get("base_shift", defaults.base_shift)),
        max_shift=float(config.get("max_shift", defaults.max_shift)),
        base_image_seq_len=int(config.get("base_image_seq_len", defaults.base_image_seq_len)),
        time_shift_type=shift_type)


def release_shift_settings(path: str) -> ShiftSettings:
    """The scheduler settings of the release ``path`` (release root, component folder or file) belongs to:
    ``scheduler/scheduler_config.json`` there or one folder up; the defaults when there is none."""
    for root in release_roots(path):
        config = os.path.join(root, "scheduler", "scheduler_config.json")
        if os.path.isfile(config):
            return read_shift_settings(config)
    return ShiftSettings()


@dataclass(frozen=True)
class FlowSchedule:
    """``model_timesteps [N]``: what the DiT is conditioned on at each step; ``sigmas [N+1]``: the shifted
    noise levels, ending in 0. Step i moves the latents by ``(sigmas[i+1] - sigmas[i]) * velocity``. Both fp32."""
    model_timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return len(self.model_timesteps)

    def starting_at(self, start_sigma: float) -> FlowSchedule:
        """The tail of the schedule from the first sigma <= ``start_sigma`` (for refining a noised latent:
        start from ``(1 - s) * x + s * noise`` with ``s = sigmas[0]`` of the result; may have 0 steps)."""
        first = int((self.sigmas > start_sigma).sum())
        return FlowSchedule(self.model_timesteps[first:], self.sigmas[first:])


def linspace_ints(start: float, stop: float, num: int) -> list[int]:
    """``numpy.linspace(start, stop, num).astype(int64)``, reproduced in float64 Python arithmetic."""
    if num == 1:
        return [int(start)]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = stop
    return [int(v) for v in values]


def shifted_sigmas(t_raw: torch.Tensor, image_seq_len: int, settings: ShiftSettings) -> torch.Tensor:
    # float32 throughout with true divisions (a python scalar over a tensor is reciprocal-times in torch)
    f32 = torch.float32
    sigmas = t_raw / torch.tensor(settings.num_train_timesteps, dtype=f32)
    mu = settings.mu(image_seq_len)
    shift = torch.tensor(mu if settings.time_shift_type == "linear" else math.exp(mu), dtype=f32)
    sigmas = shift / (shift + (torch.ones((), dtype=f32) / sigmas - 1))
    return torch.cat([sigmas, torch.zeros(1)])


def image_seq_len(height: int, width: int) -> int:
    """DiT tokens of an image: 8x VAE, 2x2 patches."""
    return (height // 8) * (width // 8) // 4


def glm_image_schedule(steps: int, height: int, width: int, settings: ShiftSettings | None = None) -> FlowSchedule:
    """``t_raw = int(linspace(T, 1, steps + 1)[:-1])``; model input ``t_raw - 1``; sigmas shifted by resolution."""
    settings = settings or ShiftSettings()
    t_raw = torch.tensor(linspace_ints(settings.num_train_timesteps, 1.0, steps + 1)[:-1], dtype=torch.float32)
    return FlowSchedule(t_raw - 1, shifted_sigmas(t_raw, image_seq_len(height, width), settings))


def cogview4_schedule(steps: int, height: int, width: int, settings: ShiftSettings | None = None) -> FlowSchedule:
    """``t_raw = int(linspace(T, 1, steps))``, fed to the model as is; sigmas shifted by resolution."""
    settings = settings or ShiftSettings()
    t_raw = torch.tensor(linspace_ints(settings.num_train_timesteps, 1.0, steps), dtype=torch.float32)
    return FlowSchedule(t_raw, shifted_sigmas(t_raw, image_seq_len(height, width), settings))
