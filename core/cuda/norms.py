"""RMSNorm of the GLM AR model and GLM-4 text encoder, alone and fused with the sandwich-norm residual.

``add_rms_norm`` is the GLM-4-0414 layer seam: ``x = residual + post_norm(branch)`` followed by the next
pre-norm of ``x``, two norms and an add in one pass (the decode step runs it twice per layer).
"""
from __future__ import annotations

import torch

from .triton_support import HAVE_TRITON, block_size, num_warps, rows

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(residual: torch.Tensor, branch: torch.Tensor, branch_weight: torch.Tensor,
                           next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = residual + rms_norm_reference(branch, branch_weight, eps)
    return x, rms_norm_reference(x, next_weight, eps)


if HAVE_TRITON:
    @triton.jit
    def _normalize(x, w, n, eps, DTYPE: tl.constexpr):
        h = round_to(x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps), DTYPE)
        return round_to(w * h, DTYPE)

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride may pass 2^31
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, _normalize(x, w, n, eps, dtype).to(dtype), mask=mask)

    @triton.jit
    def add_rms_norm_kernel(res_ptr, branch_ptr, wb_ptr, wn_ptr, x_out_ptr, h_out_ptr, stride_res, stride_branch,
                            stride_out, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        dtype: tl.constexpr = x_out_ptr.dtype.element_ty
        branch = tl.load(branch_ptr + row * stride_branch + offs, mask=mask, other=0.0).to(tl.float32)
        wb = tl.load(wb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_to(res + _normalize(branch, wb, n, eps, dtype), dtype)
        tl.store(x_out_ptr + row * stride_out + offs, x.to(dtype), mask=mask)
        wn = tl.load(wn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_out_ptr + row * stride_out + offs, _normalize(x, wn, n, eps, dtype).to(dtype), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = x2.shape[1]
    block = block_size(n)
    rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=block,
                                    num_warps=num_warps(block))
    return out.view(x.shape)


def add_rms_norm_triton(residual: torch.Tensor, branch: torch.Tensor, branch_weight: torch.Tensor,
                        next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r2, b2 = rows(residual), rows(branch)
    x_out = torch.empty(r2.shape, dtype=residual.dtype, device=residual.device)
    h_out = torch.empty_like(x_out)
    n = r2.shape[1]
    block = block_size(n)
    add_rms_norm_kernel[(r2.shape[0],)](r2, b2, branch_weight, next_weight, x_out, h_out, r2.stride(0), b2.stride(0),
                                        x_out.stride(0), n, eps, BLOCK=block, num_warps=num_warps(block))
    return x_out.view(residual.shape), h_out.view(residual.shape)
