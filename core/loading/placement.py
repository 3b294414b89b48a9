"""Where a loaded component lives and computes, resolved once from a loader's dtype choice.

A loader places the weights on one device (the nodes: the offload device; the sampling nodes move them for the
run) and the component computes on another; ``auto`` means the dtype that suits the *compute* device. Before,
``device`` meant both and the dtype string was resolved three times against two devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.reading import resolve_dtype
from ..runtime.devices import get_device

FP8_CHOICE = "fp8_e4m3fn"


@dataclass(frozen=True)
class Placement:
    """``weights``: where the weights are placed; ``compute``: where the component runs; ``dtype``: the compute
    dtype (FP8 and GGUF weights are dequantized to it per layer); ``fp8``: the ``fp8_e4m3fn`` choice (quantize
    bf16/fp32 weights to FP8 while loading, compute in ``auto``'s dtype)."""
    weights: torch.device
    compute: torch.device
    dtype: torch.dtype
    fp8: bool = False


def place(choice: str, device: torch.device | str | None = None, compute_device: torch.device | str | None = None,
          *, component: str, fp16_reason: str | None = None) -> Placement:
    """Resolve a loader's dtype ``choice`` once. ``device``: where the weights go (default: the compute
    device); ``compute_device``: where the component will run (default: ``device``). An impossible choice (fp16
    where it overflows, an unknown name) fails here, before anything is read."""
    weights = torch.device(device) if device is not None else get_device()
    compute = torch.device(compute_device) if compute_device is not None else weights
    fp8 = choice == FP8_CHOICE
    dtype = resolve_dtype("auto" if fp8 else choice, compute, component=component, fp16_reason=fp16_reason)
    return Placement(weights=weights, compute=compute, dtype=dtype, fp8=fp8)
