"""Which device computes and where weights wait: ComfyUI's choice inside ComfyUI, else the best local device."""
from __future__ import annotations

import torch

try:  # pragma: no cover - exercised only inside ComfyUI
    import comfy.model_management as _mm
except Exception:  # ImportError, or a partial ComfyUI tree
    _mm = None


def get_device() -> torch.device:
    if _mm is not None:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    if _mm is not None:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def compute_device(given: torch.device | str | None, weights: torch.device) -> torch.device:
    """The device a stage computes on: ``given`` (the one its caller placed the models for, see
    ``host.memory.on_compute_device``), else ``weights``, where the model's weights are (a model loaded whole on
    one device, as in scripts and tests)."""
    return torch.device(given) if given is not None else weights
