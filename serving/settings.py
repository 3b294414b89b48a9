"""The AR service's settings, validated once (``glm-image-serve``'s flags)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """``release``: the GLM-Image release folder (its vision_language_encoder/ and processor/ are read).
    ``max_batch``: requests of one grid size decoded together; ``batch_wait_ms``: how long the first request
    of a batch waits for others; ``max_queue``: requests waiting per replica before the service answers 503;
    ``threads``: torch CPU threads per replica (None: torch's default)."""
    release: str
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch: int = 8
    batch_wait_ms: float = 50.0
    max_queue: int = 32
    dtype: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if not os.path.isdir(self.release):
            raise ValueError(f"--release {self.release!r} is not a folder: give the GLM-Image release folder (the one "
                             f"holding vision_language_encoder/ and processor/).")
        for name, low in (("replicas", 1), ("max_batch", 1), ("max_queue", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low} (got {value!r}).")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {self.threads}).")
        for name in ("gpus_per_replica", "cpus_per_replica", "batch_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)}).")
        if self.dtype not in ("auto", "bf16", "fp32", "fp8_e4m3fn"):
            raise ValueError(f"--dtype must be auto, bf16, fp32 or fp8_e4m3fn (got {self.dtype!r}).")
