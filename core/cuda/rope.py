"""Rotary embeddings fused with what surrounds them.

- ``rope_kv_write_reference``: the AR step's partial M-RoPE (rotate-half on the first ``cos.shape[-1]`` dims)
  of q and k straight from the projections, with the rotated k and v written into their static KV-cache
  slots (fused into the decode attention kernel, ``decode_attention``).
- ``qk_layernorm_rope``: the DiT's per-head q/k LayerNorm and 2D RoPE on the image tokens, written
  ``[B, H, S, D]`` for attention; the rotation reads the normalized values once in fp32, instead of casting
  the whole q/k tensors to fp32 and back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import HAVE_TRITON, block_size, num_warps

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton

DIT_QK_EPS = 1e-5


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [B,H,L,D] in ``x``'s dtype; the rest pass through."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """q/k/v ``[B, n, heads * D]`` (projection outputs), cos/sin ``[B, 1, n, R]``, caches ``[B, kv_heads, L, D]``,
    ``index`` the 0-dim slot of the first token. Returns the rotated q ``[B, heads, n, D]``."""
    b, n, _ = q.shape
    d = cache_k.shape[-1]
    q = apply_partial_rope(q.view(b, n, -1, d).transpose(1, 2), cos, sin)
    k = apply_partial_rope(k.view(b, n, -1, d).transpose(1, 2), cos, sin)
    slots = index + torch.arange(n, device=q.device)
    cache_k.index_copy_(2, slots, k)
    cache_v.index_copy_(2, slots, v.view(b, n, -1, d).transpose(1, 2))
    return q


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x [B, S, H, D]`` with fp32 cos/sin ``[S, D]``, in fp32; result in ``x``'s dtype."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotate_half(x).float() * sin).to(x.dtype)


def qk_layernorm_rope_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_text: int) -> torch.Tensor:
    """``t [B, S, H, D]``: LayerNorm over D (no affine), RoPE on tokens ``n_text:``; returns ``[B, H, S, D]``."""
    t = F.layer_norm(t, (t.shape[-1],), eps=DIT_QK_EPS)
    return torch.cat([t[:, :n_text], apply_rope_2d(t[:, n_text:], cos, sin)], dim=1).transpose(1, 2)


if HAVE_TRITON:
    @triton.jit
    def qk_layernorm_rope_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, seq, heads, n_text, st_b, st_s, st_h,
                                 so_b, so_h, so_s, eps, D: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # b * st_b + s * st_s passes 2^31 at large batches
        b = pid // seq
        s = pid % seq
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        mask = (offs_h < heads)[:, None]
        row = t_ptr + b * st_b + s * st_s + offs_h[:, None] * st_h
        x = tl.load(row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = x - mean[:, None]
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        normed = round_to(xc * rstd[:, None], dtype)
        if s >= n_text:
            partner = (offs_d + D // 2) % D
            xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            normed_p = round_to((xp - mean[:, None]) * rstd[:, None], dtype)
            sign = tl.where(offs_d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + (s - n_text) * D + offs_d)
            sin = tl.load(sin_ptr + (s - n_text) * D + offs_d)
            normed = round_to(normed * cos[None, :] + (sign[None, :] * normed_p) * sin[None, :], dtype)
        dst = out_ptr + b * so_b + offs_h[:, None] * so_h + s * so_s + offs_d[None, :]
        tl.store(dst, normed.to(dtype), mask=mask)


def qk_layernorm_rope_triton(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_text: int) -> torch.Tensor:
    b, s, h, d = t.shape
    out = torch.empty(b, h, s, d, dtype=t.dtype, device=t.device)
    block_h = block_size(h)
    qk_layernorm_rope_kernel[(b * s,)](t, cos, sin, out, s, h, n_text, t.stride(0), t.stride(1), t.stride(2),
                                       out.stride(0), out.stride(1), out.stride(2), DIT_QK_EPS, D=d, BLOCK_H=block_h,
                                       num_warps=num_warps(block_h * d))
    return out
