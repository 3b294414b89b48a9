"""The one attention entry point of the pack.

q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq a multiple of Hkv (grouped-query attention).
On CPU this is plain ``scaled_dot_product_attention``; faster kernels are chosen here and only here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    # enable_gqa broadcasts the KV heads inside the kernel instead of copying the cache per step.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
