"""FP8 (e4m3fn) weights with scales, in the layout of ComfyUI's own "scaled fp8" checkpoints.

ComfyUI (``comfy/ops.py`` ``scaled_fp8_ops``, ``comfy/model_detection.py``) reads such a file as:
- a marker tensor ``scaled_fp8`` (empty, dtype float8_e4m3fn) at the top level of the state dict;
- per Linear layer ``<layer>.weight`` in float8_e4m3fn and ``<layer>.scale_weight`` in float32, the weight
  meaning ``weight.to(dtype) * scale_weight``; an optional ``<layer>.scale_input`` (not written here).
ComfyUI's scales are per tensor (shape ``()``); per output channel they are ``[out, 1]``, which the same
``weight * scale_weight`` broadcasts. Every other tensor stays in its own dtype.

Compute: on NVIDIA GPUs with FP8 matrix math (compute capability 8.9+) ``torch._scaled_mm`` multiplies the FP8
weight with the activations quantized per row on the fly; elsewhere each layer is dequantized to the compute
dtype as it runs (the memory saving holds, the speed-up does not).
"""
from __future__ import annotations

import logging

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MARKER = "scaled_fp8"
SCALE = "scale_weight"
INPUT_SCALE = "scale_input"
SCALE_KEYS = ("scale_weight", "weight_scale")  # ComfyUI 0.3.x; its later "comfy_quant" files say weight_scale
GRANULARITIES = ("channel", "tensor")

log = logging.getLogger("glm_image_nodes")


def quantize(weight: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> (float8_e4m3fn weight, float32 scale ``()`` or ``[out, 1]``) with
    ``weight ~ q.float() * scale``; the largest magnitude of each tensor / row maps to 448."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"FP8 scale granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    w = weight.detach().float()
    if granularity == "tensor":
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(()) if granularity == "tensor" else scale.reshape(w.shape[0], 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q.float() * scale`` in float32, then ``dtype``."""
    return (q.float() * scale.to(device=q.device, dtype=torch.float32)).to(dtype)


_capable: dict[torch.device, bool] = {}
_warned: set[str] = set()


def has_fp8_matmul(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 8.9 or newer (torch._scaled_mm with e4m3 operands)."""
    device = torch.device(device)
    if device not in _capable:
        ok = device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
        if ok:
            major, minor = torch.cuda.get_device_capability(device)
            ok = (major, minor) >= (8, 9)
        _capable[device] = ok
    return _capable[device]


def note_fallback(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Say once per device that FP8 weights are dequantized per layer there."""
    key = str(device)
    if key in _warned:
        return
    _warned.add(key)
    log.warning("FP8 weights on %s: this device has no FP8 matrix math (it needs an NVIDIA GPU of compute "
                "capability 8.9 or newer), so each layer is dequantized to %s as it runs: the memory saving "
                "holds, the FP8 speed-up does not.", key, str(compute_dtype).removeprefix("torch."))


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with FP8 operands: ``x`` quantized per row (token) to e4m3 with its own
    scale, the per-channel weight scale applied through ``scale_b`` (rowwise scaling) or, per tensor, as a
    scalar. Output in ``x``'s dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    x_scale = (x2.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    w_scale = scale.to(device=x.device, dtype=torch.float32)
    pad = (-rows) % 16  # the FP8 GEMM wants M a multiple of 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
    if w_scale.dim() == 0:
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.expand(1, weight.shape[0]).contiguous(),
                               out_dtype=x.dtype, bias=None)
    else:
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1).contiguous(),
                               out_dtype=x.dtype, bias=None)
    out = out[:rows]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])
