"""The one attention entry point of the pack.

q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq a multiple of Hkv (grouped-query attention).
mask: bool (True = attend) or additive, broadcastable to [B, Hq, Sq, Sk]. ``causal`` aligns the last query with
the last key (queries are the newest ``Sq`` of ``Sk`` positions).

Kernels are chosen here and only here:
- unmasked (causal prefill, the DiT): ``scaled_dot_product_attention`` with ``is_causal`` and ``enable_gqa``,
  no mask tensor, so CUDA can pick a fused kernel (torch's own choice, see ``sdpa_backends``); with
  ``RunOptions(attention="sage")`` or ``"flash"`` (passed as ``options=``) SageAttention or FlashAttention when
  installed and applicable (CUDA, fp16/bf16; otherwise SDPA);
- masked (padded prompts, the AR decode step on CPU): SDPA under the mask, grouped-query heads folded into the
  query length so K/V are never copied per head;
- one-token AR decode on CUDA: the pack's Triton flash-decoding kernel (``cached_decode_attention``).
On CPU the results are those of plain SDPA.
"""
from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

from ..cuda import dispatch
from ..cuda.rope import rope_kv_write_reference


class RunOptions(Protocol):
    """What the entry point reads of ``options.RunOptions`` (which imports this module, so it is not imported)."""
    attention: str
    kernels: str


BACKENDS = ("auto", "sdpa", "sage", "flash")
INSTALL = {"sage": "pip install sageattention", "flash": "pip install flash-attn (or build FlashAttention-3)"}


def installed(backend: str) -> bool:
    if backend == "sage":
        return importlib.util.find_spec("sageattention") is not None
    if backend == "flash":
        return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))
    return backend in BACKENDS


def check_backend(backend: str) -> None:
    """Refuse an unknown or missing backend before any work starts."""
    if backend not in BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(BACKENDS)} (got {backend!r}).")
    if not installed(backend):
        raise ValueError(f"attention '{backend}' needs its package, which is not installed: {INSTALL[backend]} "
                         f"(CUDA only), or choose auto / sdpa.")


def _sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA with the kernel choice left to torch (and to the user's ``torch.backends.cuda`` switches)."""
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def sage(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    from sageattention import sageattn
    return sageattn(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale)


def flash(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    """FlashAttention-3 (``flash_attn_interface``) or -2 (``flash_attn``): ``[B, S, H, D]`` layout, native GQA,
    causal aligned bottom-right like the pack's."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        from flash_attn import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _optional_kernel(q, k, v, causal: bool, scale: float | None, backend: str) -> torch.Tensor | None:
    if backend not in ("sage", "flash") or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if backend == "sage":
        if causal and q.shape[2] != k.shape[2] or q.shape[-1] not in (64, 128):
            return None
        return sage(q, k, v, causal, scale)
    return flash(q, k, v, causal, scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None,
              options: RunOptions | None = None) -> torch.Tensor:
    """``options.attention`` picks the kernel of unmasked calls (None: auto)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if mask is None:
        out = _optional_kernel(q, k, v, causal, scale, options.attention if options is not None else "auto")
        if out is not None:
            return out
        if not causal or sq == sk:
            return _sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=hq != hkv)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if hq == hkv:
        return _sdpa(q, k, v, attn_mask=mask, scale=scale)
    # Grouped-query attention under a mask: fold the query heads of each KV head into the query length, so the
    # K/V cache is never copied per head.
    group = hq // hkv
    mask = mask.expand(b, hq, sq, sk).reshape(b, hkv, group * sq, sk)
    out = _sdpa(q.reshape(b, hkv, group * sq, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, sq, d)


def cached_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, *, mask: torch.Tensor | None,
                            key_valid: torch.Tensor, index: torch.Tensor, scale: float,
                            options: RunOptions | None = None) -> torch.Tensor:
    """AR decode over the whole static cache, from the projections ``[B, n, * D]``: RoPE, the k/v cache write at
    slot ``index`` and attention; returns the ``o_proj`` input ``[B, n, heads * D]``. The fused kernel when
    the model asked for it (``mask`` None, see ``dispatch.decode_attention_fused``), else the torch reference
    and SDPA under the reference's ``mask``."""
    b, n, _ = q.shape
    mode = options.kernels if options is not None else None
    if mask is None and n == 1 and dispatch.decode_attention_fused(q, mode):
        return dispatch.decode_attention_op(q, k, v, cos, sin, cache_k, cache_v, key_valid, index, scale)
    q = rope_kv_write_reference(q, k, v, cos, sin, cache_k, cache_v, index)
    return attention(q, cache_k, cache_v, mask=mask, scale=scale, options=options).transpose(1, 2).reshape(b, n, -1)
