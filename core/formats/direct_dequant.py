"""Packed weights straight to the compute dtype, where that gives the same values as through float32.

The float32 route (``ggml.dequantize`` then ``.to(dtype)``; FP8 ``q.float() * scale``) writes and reads a
float32 copy of every weight per call: ~19 bytes moved per weight before the GEMM reads its 2. Here:
- FP8 (``fp8.dequantize``): ``q.to(dtype)`` is exact (e4m3/e5m2 values are bf16 and fp16 values), and the
  in-place ``mul_`` by the float32 scale computes each product in float32 and rounds it once to ``dtype``: the
  float32 route's values. A bf16 scale (``q.to(bf16) * scale.to(bf16)``) is not exact: it changes ~21 % of the
  bf16 weights of a per-channel-scaled tensor (``tests/test_direct_dequant.py`` measures it), so it is not used.
- GGUF F16/BF16/F32: one cast (exact where the float32 route's second cast is the only rounding).
- GGUF Q8_0: int8 -> ``dtype`` is exact (|q| <= 127), then ``mul_`` by the float32 block scale, one rounding.
- The other block formats (Q4_0, Q5_x, the K-quants) compute ``d * q - m`` in two roundings in float32; they
  keep the float32 route (``None`` here).
"""
from __future__ import annotations

import torch

from . import ggml

DIRECT_KINDS = ("fp8", "F32", "F16", "BF16", "Q8_0")


def gguf_to(data: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A GGUF tensor in ``dtype`` without a float32 copy, or None where that would change values."""
    if kind not in DIRECT_KINDS[1:]:
        return None
    raw = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    if kind in ggml.FLOAT_TYPES:
        source = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        return raw.view(source).reshape(shape).to(dtype)
    blocks = raw.reshape(-1, ggml.QTYPES[kind].type_size)
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    return blocks[:, 2:].contiguous().view(torch.int8).to(dtype).mul_(scale).reshape(shape)


def gguf_in(data: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor in ``dtype``: directly where that is exact, else through float32 (``ggml.dequantize``)."""
    direct = gguf_to(data, kind, shape, dtype)
    return direct if direct is not None else ggml.dequantize(data, ggml.QTYPES[kind], shape).to(dtype)
