"""One-pass dequantization: packed FP8 / GGUF bytes in, the compute-dtype weight out, each read and written once.

The torch routes (``core/formats``) write a float32 or compute-dtype copy, then read and rewrite it per op
(cast, scale, offset); these kernels read the packed bytes once and write each weight once. The values are the
float32 route's: every product and offset in fp32 in the reference's order (``d * q - m``: ``d * q`` is exact
for the K-quants, Q4_0, Q5_x and Q8_0, so a fused multiply-add rounds the same), then one round-to-nearest-even
to the output dtype (``round_to``: the interpreter's casts truncate). The bytes are decoded by bit
arithmetic (FP8 through the float16 bit layout), so the interpreter runs them on CPU tensors.

The torch references (what runs off CUDA, and what the self-check compares with) are the formats' own routes:
``core/formats/fused_dequant.py`` registers the ops.
"""
from __future__ import annotations

import torch

from .triton_support import HAVE_TRITON

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton

FP8_BLOCK = 1024
TILE = 1024  # values per program of a GGUF kernel
# kind: (kernel code, bytes per block, values per block)
GGUF_KINDS = {"Q8_0": (0, 34, 32), "Q4_0": (1, 18, 32), "Q5_0": (2, 22, 32), "Q5_1": (3, 24, 32),
              "Q4_K": (4, 144, 256), "Q5_K": (5, 176, 256), "Q6_K": (6, 210, 256)}

if HAVE_TRITON:
    @triton.jit
    def _byte(ptr, offs, mask):
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(ptr, offs, mask):
        """The little-endian float16 at byte ``offs``, as fp32."""
        bits = _byte(ptr, offs, mask) | (_byte(ptr, offs + 1, mask) << 8)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _scale_min_k4(ptr, offs, s, mask):
        """Sub-block ``s``'s six-bit scale and min from the 12 bytes at ``offs`` (Q4_K, Q5_K)."""
        low = s < 4
        a = _byte(ptr, offs + s, mask)            # s < 4: the scale's byte
        b = _byte(ptr, offs + s + 4, mask)        # s < 4: the min's byte; s >= 4: the packed low bits
        c = _byte(ptr, offs + (s % 4), mask)      # s >= 4: high bits of the scale (bytes 0..3)
        scale = tl.where(low, a & 0x3F, (b & 0x0F) | ((c >> 2) & 0x30))
        minimum = tl.where(low, b & 0x3F, (b >> 4) | ((a >> 2) & 0x30))
        return scale, minimum

    @triton.jit
    def fp8_kernel(q_ptr, scale_ptr, out_ptr, cols, scale_stride, E5M2: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * cols may pass 2^31
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        bits = tl.load(q_ptr + row * cols + offs, mask=mask, other=0).to(tl.int32)
        if E5M2:  # the high byte of a float16
            value = (bits << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # e4m3fn's exponent and mantissa in float16's, 2^8 off (its bias is 7, float16's 15)
            magnitude = ((bits & 0x7F) << 7).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
            value = tl.where(bits >= 0x80, -magnitude, magnitude)
            value = tl.where((bits & 0x7F) == 0x7F, float("nan"), value)
        scale = tl.load(scale_ptr + row * scale_stride)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * cols + offs, round_to(value * scale, dtype).to(dtype), mask=mask)

    @triton.jit
    def gguf_kernel(b_ptr, out_ptr, n_blocks, KIND: tl.constexpr, TYPE_SIZE: tl.constexpr, VALUES: tl.constexpr,
                    NB: tl.constexpr):
        first = tl.program_id(0).to(tl.int64) * NB  # 64-bit offsets
        blocks = b_ptr + first * TYPE_SIZE
        local = tl.arange(0, NB)[:, None]
        e = tl.arange(0, VALUES)[None, :]
        mask = ((first + local) < n_blocks) & (e < VALUES)
        row = local * TYPE_SIZE
        if KIND == 0:  # Q8_0: f16 d, 32 int8
            value = _f16(blocks, row, mask) * _byte(blocks, row + 2 + e, mask).to(tl.int8).to(tl.float32)
        elif KIND == 1:  # Q4_0: f16 d, 16 bytes of nibbles (low nibbles first), q - 8
            q = (_byte(blocks, row + 2 + e % 16, mask) >> (e // 16 * 4)) & 0x0F
            value = _f16(blocks, row, mask) * (q - 8).to(tl.float32)
        elif KIND == 2 or KIND == 3:  # Q5_0 (q - 16) / Q5_1 (+ m): f16 d [, f16 m], 32 high bits, nibbles
            QS: tl.constexpr = 6 if KIND == 2 else 8
            low = (_byte(blocks, row + QS + e % 16, mask) >> (e // 16 * 4)) & 0x0F
            high = (_byte(blocks, row + QS - 4 + e // 8, mask) >> (e % 8)) & 1
            q = low | (high << 4)
            if KIND == 2:
                value = _f16(blocks, row, mask) * (q - 16).to(tl.float32)
            else:
                value = _f16(blocks, row, mask) * q.to(tl.float32) + _f16(blocks, row + 2, mask)
        elif KIND == 4 or KIND == 5:  # Q4_K / Q5_K: f16 d, f16 dmin, 12 scale bytes, [32 high-bit bytes,] nibbles
            s = e // 32
            scale, minimum = _scale_min_k4(blocks, row + 4, s, mask)
            d = _f16(blocks, row, mask) * scale.to(tl.float32)
            dm = _f16(blocks, row + 2, mask) * minimum.to(tl.float32)
            QS: tl.constexpr = 16 if KIND == 4 else 48
            q = (_byte(blocks, row + QS + (s // 2) * 32 + e % 32, mask) >> (s % 2 * 4)) & 0x0F
            if KIND == 5:
                q = q | (((_byte(blocks, row + 16 + e % 32, mask) >> s) & 1) << 4)
            value = d * q.to(tl.float32) - dm
        else:  # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d
            low = (_byte(blocks, row + (e // 128) * 64 + e % 64, mask) >> ((e // 64) % 2 * 4)) & 0x0F
            high = (_byte(blocks, row + 128 + (e // 128) * 32 + e % 32, mask) >> ((e // 32) % 4 * 2)) & 0x03
            scale = _byte(blocks, row + 192 + e // 16, mask).to(tl.int8).to(tl.float32)
            d = _f16(blocks, row + 208, mask) * scale
            value = d * ((low | (high << 4)) - 32).to(tl.float32)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + first * VALUES + local * VALUES + e, round_to(value, dtype).to(dtype), mask=mask)


def fp8_triton(q_bytes: torch.Tensor, e5m2: bool, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q_bytes [rows, cols]``: a float8_e4m3fn (or, ``e5m2``, float8_e5m2) weight's bytes (uint8); ``scale``
    float32 of one value or one per row -> ``dtype``."""
    q2 = q_bytes.reshape(-1, q_bytes.shape[-1]).contiguous()
    rows, cols = q2.shape
    flat = scale.reshape(-1).to(torch.float32)
    out = torch.empty(rows, cols, dtype=dtype, device=q_bytes.device)
    fp8_kernel[(rows, triton.cdiv(cols, FP8_BLOCK))](q2, flat, out, cols, 0 if flat.numel() == 1 else 1,
                                                     E5M2=e5m2, BLOCK=FP8_BLOCK, num_warps=4)
    return out.view(q_bytes.shape)


def gguf_triton(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``blocks [n, bytes per block]`` (uint8) of GGML type ``kind`` -> ``[n, values per block]`` in ``dtype``."""
    code, type_size, values = GGUF_KINDS[kind]
    blocks = blocks.contiguous()
    n = blocks.shape[0]
    out = torch.empty(n, values, dtype=dtype, device=blocks.device)
    nb = TILE // values
    gguf_kernel[(triton.cdiv(n, nb),)](blocks, out, n, KIND=code, TYPE_SIZE=type_size, VALUES=values, NB=nb,
                                      num_warps=4)
    return out
