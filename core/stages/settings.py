"""The sampler settings, each checked once where the object is built.

A node's ``VALIDATE_INPUTS``, the node's run and the core stage all build or receive the same frozen object, so
each rule (range, message) lives in ``__post_init__`` here and nowhere else. ``from_widgets`` builds one from a
node's widget values by field name; a value that arrives through a link (None while ComfyUI validates) takes
the field's default there and is checked when the node runs. ``tests/test_settings.py`` proves every widget of
each sampler node is a field, so renaming one fails a test instead of switching a check off.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from ..runtime import checks
from .flow_schedule import ShiftSettings

DECODE_STEPS = ("eager", "cuda graph", "compiled")


def from_widgets(cls, values: Mapping):
    """``cls`` (a settings dataclass) from the widget values named like its fields; None and absent values take
    the field's default."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})


@dataclass(frozen=True)
class ARSampling:
    """The AR token sampler's settings: transformers' warpers (temperature 0 is greedy), images per prompt,
    and how the decode steps run (``DECODE_STEPS``)."""
    seed: int = 0
    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 16512
    num_images: int = 1
    decode_steps: str = "eager"

    def __post_init__(self):
        checks.check_float(self.temperature, "temperature", 0.0, fix=(
            "Use a temperature of at least 0 (0.9 is the release's default; 0 is greedy decoding)."))
        checks.check_float(self.top_p, "top_p", 0.0, 1.0, low_open=True, fix="Use a top_p in (0, 1] (1 disables it).")
        checks.check_int(self.top_k, "top_k", 1,
                         fix="Use a top_k of at least 1; 16512 (the vision vocabulary) disables it.")
        checks.check_count(self.num_images, "num_images")
        checks.check_seed(self.seed)
        if self.decode_steps not in DECODE_STEPS:
            raise ValueError(f"decode_steps must be one of {', '.join(DECODE_STEPS)} (got {self.decode_steps!r}).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DecoderRun:
    """One decoder sampling run (GLM-Image or CogView4): Euler steps, CFG guidance (> 1 adds the unconditional
    branch; CogView4's default is 5.0, GLM-Image's 1.5), the seed of the initial noise, the first-block step
    cache threshold (0 = off, exact) and the release's scheduler settings (None: the release's defaults)."""
    seed: int = 0
    steps: int = 50
    guidance: float = 1.5
    step_cache: float = 0.0
    shift_settings: ShiftSettings | None = None

    def __post_init__(self):
        checks.check_steps(self.steps)
        checks.check_guidance(self.guidance)
        checks.check_seed(self.seed)
        checks.check_float(self.step_cache, "step_cache")
        if self.step_cache < 0:
            raise ValueError(f"step_cache must be >= 0 (got {self.step_cache}); 0 turns it off.")

    @property
    def cfg(self) -> bool:
        return self.guidance > 1
