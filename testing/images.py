"""Image comparisons for tests and benchmarks: an antialiased resize down, and PSNR."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def downscale_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area (box-filter) resize of ``[H, W, 3]`` to ``height`` x ``width``: the antialiased way down for PSNR."""
    x = image.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(height, width), mode="area")[0].permute(1, 2, 0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in 0..1 (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)
