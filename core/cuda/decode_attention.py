"""The AR decode step's attention in one pass: partial M-RoPE of q and the new k straight from the projections,
the new k/v written to their static KV-cache slot, and one-token attention over the cache (flash-decoding,
grouped-query), returning the ``o_proj`` input ``[B, 1, heads * D]``.

The cache is allocated for the whole generation, so most slots are empty early on: each program reads only
the keys up to the current slot. Programs split the keys (so a batch of one still fills the GPU) and hold
all the query heads of one KV head, so K/V are read once per group; each program rotates its own q rows and
the new k (a few hundred values), uses them from registers for the current slot, and the program whose split
holds that slot writes it to the cache (no program reads another's write). A second small kernel merges the
splits. Key ``j`` is visible to the query at ``index`` iff ``(j <= index and key_valid[b, j]) or j == index``,
the mask the reference builds (left padding is invalid; a padding query sees itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import rope_kv_write_reference
from .triton_support import HAVE_TRITON, block_size

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton

    NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity": empty splits merge with weight 0, never NaN

BLOCK_N = 16
TARGET_PROGRAMS = 256


def decode_mask(key_valid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, 1, L]`` of the keys the query at slot ``index`` attends to."""
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    return (((keys <= index) & key_valid) | (keys == index))[:, None, None, :]


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               cache_k: torch.Tensor, cache_v: torch.Tensor, key_valid: torch.Tensor,
                               index: torch.Tensor, scale: float) -> torch.Tensor:
    """q/k/v ``[B, 1, heads * D]`` (projections), cos/sin ``[B, 1, 1, R]``, caches ``[B, kv_heads, L, D]`` (k/v
    written at ``index``); returns ``[B, 1, heads * D]``."""
    b, n, _ = q.shape
    q = rope_kv_write_reference(q, k, v, cos, sin, cache_k, cache_v, index)
    group = q.shape[1] // cache_k.shape[1]
    keys, values = cache_k.repeat_interleave(group, 1), cache_v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=decode_mask(key_valid, index), scale=scale)
    return out.transpose(1, 2).reshape(b, n, -1)


def split_blocks(batch: int, kv_heads: int, length: int) -> int:
    """Key blocks per program: enough programs to fill the GPU, whatever the batch."""
    blocks = triton.cdiv(length, BLOCK_N)
    splits = max(1, min(blocks, TARGET_PROGRAMS // max(1, batch * kv_heads)))
    return triton.cdiv(blocks, splits)


if HAVE_TRITON:
    @triton.jit
    def decode_partial_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, ck_ptr, cv_ptr, valid_ptr, index_ptr, acc_ptr,
                              ml_ptr, kv_heads, length, splits, sq_b, sk_b, sv_b, s_cos, sc_b, sc_h, sc_l, s_valid,
                              scale, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                              BLOCK_N: tl.constexpr, SPLIT_BLOCKS: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // kv_heads
        kvh = bh % kv_heads
        dtype: tl.constexpr = ck_ptr.dtype.element_ty
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        in_group = offs_g < GROUP
        # rotate-half RoPE on the first R dims, each product and the sum rounded like the reference's ops
        rotated = offs_d < R
        partner = tl.where(offs_d < R // 2, offs_d + R // 2, offs_d - R // 2)
        sign = tl.where(offs_d < R // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * s_cos + offs_d, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * s_cos + offs_d, mask=rotated, other=0.0).to(tl.float32)
        q_rows = q_ptr + b * sq_b + (kvh * GROUP + offs_g)[:, None] * D
        x = tl.load(q_rows + offs_d[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
        xp = tl.load(q_rows + partner[None, :], mask=in_group[:, None] & rotated[None, :], other=0.0).to(tl.float32)
        q = round_to(round_to(x * cos[None, :], dtype) + round_to(sign[None, :] * xp * sin[None, :], dtype), dtype)
        q = tl.where(rotated[None, :], q, x)
        k_row = k_ptr + b * sk_b + kvh * D
        kx = tl.load(k_row + offs_d).to(tl.float32)
        kxp = tl.load(k_row + partner, mask=rotated, other=0.0).to(tl.float32)
        k_new = tl.where(rotated, round_to(round_to(kx * cos, dtype) + round_to(sign * kxp * sin, dtype), dtype), kx)
        v_new = tl.load(v_ptr + b * sv_b + kvh * D + offs_d).to(tl.float32)
        index = tl.load(index_ptr)
        m_i = tl.full((BLOCK_G,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        start = split * SPLIT_BLOCKS * BLOCK_N
        end = start + SPLIT_BLOCKS * BLOCK_N
        cache_row = b * sc_b + kvh * sc_h
        if (index >= start) & (index < end):  # this split holds the new slot: write it
            tl.store(ck_ptr + cache_row + index * sc_l + offs_d, k_new.to(dtype))
            tl.store(cv_ptr + cache_row + index * sc_l + offs_d, v_new.to(dtype))
        stop = tl.minimum(end, index + 1)  # nothing after the current slot is visible
        # a constant trip count with a guard, not range(start, stop): Triton 3.6's interpreter cannot take a
        # loaded loop bound, and a split is a few blocks long
        for i in range(SPLIT_BLOCKS):
            j = start + i * BLOCK_N
            if j < stop:
                offs_n = j + tl.arange(0, BLOCK_N)
                live = offs_n < stop
                current = (offs_n == index)[:, None]
                keys = tl.load(ck_ptr + cache_row + offs_n[:, None] * sc_l + offs_d[None, :], mask=live[:, None],
                               other=0.0).to(tl.float32)
                keys = tl.where(current, k_new[None, :], keys)
                valid = tl.load(valid_ptr + b * s_valid + offs_n, mask=live, other=0) != 0
                seen = live & (valid | (offs_n == index))
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
                scores = tl.where(seen[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                p = tl.exp(scores - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                values = tl.load(cv_ptr + cache_row + offs_n[:, None] * sc_l + offs_d[None, :], mask=live[:, None],
                                 other=0.0).to(tl.float32)
                values = tl.where(current, v_new[None, :], values)
                acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
        row = (b * kv_heads * GROUP + kvh * GROUP + offs_g) * splits + split
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=in_group[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=in_group)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=in_group)

    @triton.jit
    def decode_merge_kernel(acc_ptr, ml_ptr, out_ptr, splits, so_bh, D: tl.constexpr, BLOCK_S: tl.constexpr,
                            MAX_SPLITS: tl.constexpr):
        bh = tl.program_id(0)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        offs_d = tl.arange(0, D)
        m_max = tl.full((BLOCK_S,), NEG, tl.float32)
        for s in range(0, MAX_SPLITS, BLOCK_S):  # constant bounds, guarded: see decode_partial_kernel
            if s < splits:
                offs_s = s + tl.arange(0, BLOCK_S)
                m_max = tl.maximum(m_max, tl.load(ml_ptr + (bh * splits + offs_s) * 2, mask=offs_s < splits,
                                                  other=NEG))
        m_max = tl.max(m_max, axis=0)
        total = tl.zeros((D,), tl.float32)
        weight = tl.zeros((BLOCK_S,), tl.float32)
        for s in range(0, MAX_SPLITS, BLOCK_S):
            if s < splits:
                offs_s = s + tl.arange(0, BLOCK_S)
                live = offs_s < splits
                row = bh * splits + offs_s
                w = tl.where(live, tl.exp(tl.load(ml_ptr + row * 2, mask=live, other=NEG) - m_max), 0.0)
                weight += w * tl.load(ml_ptr + row * 2 + 1, mask=live, other=0.0)
                acc = tl.load(acc_ptr + row[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
                total += tl.sum(acc * w[:, None], axis=0)
        out = total / tl.sum(weight, axis=0)
        tl.store(out_ptr + bh * so_bh + offs_d, round_to(out, dtype).to(dtype))


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, key_valid: torch.Tensor,
                            index: torch.Tensor, scale: float) -> torch.Tensor:
    b, _, d = q.shape[0], q.shape[1], cache_k.shape[3]
    heads, kv_heads, length = q.shape[2] // d, cache_k.shape[1], cache_k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos, sin = cos.expand(b, 1, 1, -1).contiguous(), sin.expand(b, 1, 1, -1).contiguous()
    assert cache_k.stride() == cache_v.stride() and cache_k.stride(-1) == 1
    group = heads // kv_heads
    blocks_per_split = split_blocks(b, kv_heads, length)
    splits = triton.cdiv(triton.cdiv(length, BLOCK_N), blocks_per_split)
    acc = torch.empty(b * heads * splits, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * heads * splits, 2, dtype=torch.float32, device=q.device)
    valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
    decode_partial_kernel[(b * kv_heads, splits)](
        q, k, v, cos, sin, cache_k, cache_v, valid, index, acc, ml, kv_heads, length, splits, q.stride(0), k.stride(0),
        v.stride(0), cos.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), valid.stride(0), scale,
        GROUP=group, BLOCK_G=block_size(group), D=d, R=cos.shape[-1], BLOCK_N=BLOCK_N, SPLIT_BLOCKS=blocks_per_split,
        num_warps=8)
    out = torch.empty(b, 1, heads * d, dtype=q.dtype, device=q.device)
    assert splits <= TARGET_PROGRAMS, splits
    decode_merge_kernel[(b * heads,)](acc, ml, out, splits, d, D=d, BLOCK_S=16, MAX_SPLITS=TARGET_PROGRAMS, num_warps=2)
    return out
