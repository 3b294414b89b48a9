"""The one attention entry point of the pack.

q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq a multiple of Hkv (grouped-query attention).
mask: bool (True = attend) or additive, broadcastable to [B, Hq, Sq, Sk].
On CPU this is plain ``scaled_dot_product_attention``; faster kernels are chosen here and only here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq == hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    # Grouped-query attention: fold the query heads of each KV head into the query length, so no kernel
    # needs a GQA mode and the K/V cache is never copied per head.
    group = hq // hkv
    if causal and mask is None:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if mask is not None:
        mask = mask.expand(b, hq, sq, sk).reshape(b, hkv, group * sq, sk)
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, group * sq, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, sq, d)
