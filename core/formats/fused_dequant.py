"""Packed weights to the compute dtype in one pass on CUDA (``core/cuda/dequant.py``), the torch routes elsewhere.

Two custom ops, ``glm_image_nodes::dequant_fp8`` and ``glm_image_nodes::dequant_gguf``: on CUDA the Triton kernel
(packed bytes read once, the weight written once), on other devices, and where the kernel failed its self-check,
the torch route the layers used before (``fp8.dequantize``, ``direct_dequant.gguf_to``, else ``ggml.dequantize``
in float32 then one cast), whose values the kernels reproduce bit for bit. Each format has its own first-use
self-check (``dequant_fp8``, ``dequant_Q4_K``...) on random bytes (every bit pattern but NaN), exact: tolerance 0.
"""
from __future__ import annotations

import torch

from ..cuda import dequant, dispatch, self_check
from . import direct_dequant, fp8, ggml

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GGUF_KINDS = tuple(dequant.GGUF_KINDS)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
              "Q6_K": (208,)}  # byte offsets of a block's float16 scales and mins


def op_name(kind: str) -> str:
    """The self-check's name of the fused dequantization of ``kind`` (``"fp8"`` or a GGML type)."""
    return f"dequant_{kind}"


def fp8_reference(q_bytes: torch.Tensor, e5m2: bool, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q_bytes``: the float8 weight's bytes (uint8; the custom op takes no float8 tensors)."""
    return fp8.dequantize(q_bytes.view(FP8_DTYPES[e5m2]), scale, dtype)


def gguf_reference(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    return direct_dequant.gguf_in(blocks, kind, (blocks.shape[0], ggml.QTYPES[kind].block_size), dtype)


def _fp8_fake(q, e5m2, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _gguf_fake(blocks, kind, dtype):
    return blocks.new_empty(blocks.shape[0], ggml.QTYPES[kind].block_size, dtype=dtype)


FP8_OP = dispatch.custom_op("dequant_fp8", fp8_reference, dequant.fp8_triton, _fp8_fake)
GGUF_OP = dispatch.custom_op("dequant_gguf", gguf_reference, dequant.gguf_triton, _gguf_fake)


def _run_fp8(q_bytes, e5m2, scale, dtype):
    return (dequant.fp8_triton if dispatch.launches_directly(q_bytes) else FP8_OP)(q_bytes, e5m2, scale, dtype)


def _run_gguf(blocks, kind, dtype):
    return (dequant.gguf_triton if dispatch.launches_directly(blocks) else GGUF_OP)(blocks, kind, dtype)


def applies(data: torch.Tensor, kind: str, scale: torch.Tensor | None, dtype: torch.dtype,
            mode: str | None = None) -> bool:
    """Whether the fused op dequantizes this packed weight (its format, layout, device and self-check)."""
    if data.numel() == 0:  # an embedding lookup of no ids: no launch
        return False
    if kind == "fp8":
        rows = data.shape[0] if data.dim() == 2 else -1
        if data.dtype not in FP8_DTYPES or scale is None or scale.numel() not in (1, rows):
            return False
    elif kind not in GGUF_KINDS:
        return False
    return dispatch.fused_for(data.device, dtype, op_name(kind), mode)


def dequantize(data: torch.Tensor, kind: str, shape: tuple[int, ...], scale: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The fused op's result for a weight ``applies`` accepted."""
    if kind == "fp8":
        return _run_fp8(data.view(torch.uint8), data.dtype == torch.float8_e5m2,
                        scale.to(device=data.device, dtype=torch.float32), dtype)
    raw = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    return _run_gguf(raw.view(-1, ggml.QTYPES[kind].type_size), kind, dtype).view(shape)


# ---- self-check samples: random bytes with finite float16 scales ------------------------------------------
def sample_fp8(device, dtype, rows=24, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x7E  # e4m3fn's NaNs
    scale = torch.rand(rows, 1, generator=g) * 1e-2
    return bits.to(device), False, scale.to(device), dtype


def sample_gguf(kind: str, device, dtype, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, ggml.QTYPES[kind].type_size), generator=g, dtype=torch.uint8)
    for offset in F16_FIELDS[kind]:
        blocks[:, offset:offset + 2] = (torch.randn(n, 1, generator=g) * 0.01).half().view(torch.uint8)
    return blocks.to(device), kind, dtype


def both_fp8_formats(run):
    """``run`` (an FP8 dequantization) on the sample's bytes as e4m3fn and, with e5m2's infinities and NaNs moved
    down 2^16 (bit 6 off), as e5m2: one check covers both kernels."""
    def both(q_bytes, _e5m2, scale, dtype):
        finite = torch.where((q_bytes & 0x7C) == 0x7C, q_bytes & 0xBF, q_bytes)
        return run(q_bytes, False, scale, dtype), run(finite, True, scale, dtype)
    return both


def _exact(_dtype):
    return 0.0


# the checks run what the layers would run (looked up at call time)
self_check.register(op_name("fp8"), self_check.Check(
    fused=both_fp8_formats(lambda *args: _run_fp8(*args)), reference=both_fp8_formats(fp8_reference),
    sample=sample_fp8, tolerance=_exact))
for _kind in GGUF_KINDS:
    self_check.register(op_name(_kind), self_check.Check(
        fused=lambda *args: _run_gguf(*args), reference=gguf_reference,
        sample=lambda device, dtype, _kind=_kind: sample_gguf(_kind, device, dtype), tolerance=_exact))
