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
import torch.nn.functional as F

from ..cuda import self_check
from . import fp8_activation

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
    """``q.float() * scale`` in float32, then ``dtype``: the same values, without a float32 copy of the weight
    (``q.to(dtype)`` is exact; ``mul_`` computes each product in float32 and rounds it once; direct_dequant)."""
    return q.to(dtype).mul_(scale.to(device=q.device, dtype=torch.float32))


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


def rowwise_scaling(device: torch.device) -> bool:
    """``_scaled_mm`` with a scale per row / column needs Hopper (9.0) or newer; Ada (8.9) takes scalar scales."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def fits_scaled_mm(weight: torch.Tensor) -> bool:
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     rowwise: bool | None = None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with FP8 operands (``weight`` float8 ``[out, in]``, both dims multiples
    of 16). ``rowwise`` (default: what the device supports): ``x`` quantized to e4m3 with a scale per row (token)
    and the weight's per-channel scale given to the GEMM; else one scale for all of ``x`` and the per-channel
    weight scale applied to the float32 output. Result in ``x``'s dtype."""
    rowwise = rowwise_scaling(x.device) if rowwise is None else rowwise
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, out_features = x2.shape[0], weight.shape[0]
    xq, x_scale = fp8_activation.fused_quantize(x2, rowwise)
    pad = (-rows) % 16  # the FP8 GEMM wants M a multiple of 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
        if rowwise:
            x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
    w_scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1, 1).expand(out_features, 1)
    if rowwise:
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1).contiguous(),
                               out_dtype=x.dtype)
    else:
        one = torch.ones((), device=x.device, dtype=torch.float32)
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.reshape(()), scale_b=one, out_dtype=torch.float32)
        out = (out * w_scale.reshape(1, -1)).to(x.dtype)
    out = out[:rows]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], out_features)


SCALED_MM_TOLERANCE = 0.06  # error norm / reference norm: e4m3 activations and weights measure 2.6-2.8 %


def _scaled_mm_sample(device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    weight, scale = quantize(torch.randn(48, 64, generator=g))
    x = torch.randn(5, 64, generator=g).to(device=device, dtype=dtype)
    return x, weight.to(device), scale.to(device), torch.randn(48, generator=g).to(device=device, dtype=dtype)


def _dequantized_linear(x, weight, scale, bias):
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


self_check.register("scaled_mm", self_check.Check(
    fused=lambda *args: scaled_mm_linear(*args), reference=_dequantized_linear, sample=_scaled_mm_sample,
    tolerance=lambda dtype: SCALED_MM_TOLERANCE, relative=True,
    off_switch="GLMIMAGE_KERNELS=reference does not switch the FP8 GEMM off; a model loaded in bf16 does not use it"))
