"""Which SDPA kernel torch runs, and how to restrict the choice on the torch that is installed.

The pack leaves the choice to torch on every device: torch prefers cuDNN attention only where it is known
right and fast (sm90/sm100 with cuDNN > 9.15, ``check_prefer_cudnn_attention`` in sdp_utils.cpp; older cuDNN
gives wrong results for query lengths not a multiple of 128, pytorch#169849), flash attention elsewhere, and a
user's own ``torch.backends.cuda.enable_*_sdp`` switches or ``sdpa_kernel`` block are honoured. ``restricted``
is for callers that must try one backend (the system check): ``set_priority`` only where the installed
torch has it (2.6+; under ``torch.compile`` it asserts in 2.6, pytorch#149725).
"""
from __future__ import annotations

import inspect
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAMES = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
         SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}
PREFERENCE = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def has_set_priority(kernel=sdpa_kernel) -> bool:
    try:
        return "set_priority" in inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return False


def restricted(backends: list, kernel=sdpa_kernel) -> AbstractContextManager:
    """Only ``backends``, tried in the given order where this torch can order them (else in torch's order)."""
    if has_set_priority(kernel) and len(backends) > 1:
        return kernel(backends, set_priority=True)
    return kernel(backends)


def torch_prefers_cudnn(capability: tuple[int, int], cudnn_version: int | None) -> bool:
    """torch's own rule (2.10+) for putting cuDNN attention first."""
    return capability in ((9, 0), (10, 0)) and (cudnn_version or 0) > 91500


def runnable(q, k, v, **kwargs) -> list[str]:
    """The backends that run these inputs, in torch's preference order for the device (first = torch's pick
    on CUDA, unless a user switch disables it)."""
    ok = []
    for backend in PREFERENCE:
        try:
            with restricted([backend]):
                F.scaled_dot_product_attention(q, k, v, **kwargs)
            ok.append(NAMES[backend])
        except RuntimeError:
            continue
    if q.is_cuda and ok and ok[0] == "cudnn":
        capability = torch.cuda.get_device_capability(q.device)
        if not torch_prefers_cudnn(capability, torch.backends.cudnn.version()):
            ok = ok[1:] + ["cudnn"]
    return ok
