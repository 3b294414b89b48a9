"""First-block step cache for the DiT (ParaAttention's first-block cache, TeaCache-style residual reuse).

Consecutive denoising steps change the DiT's input little. After the first block, compare its residual
(output - input) with the one of the last fully computed step: if the mean absolute change, relative to
that residual, is below ``threshold``, skip the other blocks and add the residual they produced at that step.
Off (``threshold`` 0) the output is exact; higher thresholds skip more blocks and drift more. One
``BranchCache`` per kind of forward (a batched CFG pair, or the conditional and unconditional passes).
"""
from __future__ import annotations

import torch


class BranchCache:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.first: torch.Tensor | None = None
        self.rest: torch.Tensor | None = None
        self.computed = 0
        self.reused = 0

    def reusable(self, first: torch.Tensor) -> bool:
        """Whether the remaining blocks can be skipped for this first-block residual (one host sync)."""
        if self.first is None or self.first.shape != first.shape:
            return False
        change = (first - self.first).abs().mean() / self.first.abs().mean().clamp_min(1e-12)
        if float(change) < self.threshold:
            self.reused += 1
            return True
        return False

    def store(self, first: torch.Tensor, rest: torch.Tensor) -> None:
        self.first, self.rest = first, rest
        self.computed += 1


class StepCache:
    """The branches of one sampling run; ``threshold`` <= 0 disables the cache."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.branches: dict[str, BranchCache] = {}

    def branch(self, name: str) -> BranchCache | None:
        if self.threshold <= 0:
            return None
        return self.branches.setdefault(name, BranchCache(self.threshold))
