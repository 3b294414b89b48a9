"""The GLM MLP's activation: ``up * silu(gate)`` on the fused ``gate_up_proj`` output (gate first)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import HAVE_TRITON, rows

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton

BLOCK = 1024


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


if HAVE_TRITON:
    @triton.jit
    def silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride may pass 2^31
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0).to(tl.float32)
        silu = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
        tl.store(out_ptr + row * stride_out + offs, round_to(up * silu, dtype).to(dtype), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    x2 = rows(gate_up)
    n = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    silu_mul_kernel[(x2.shape[0], triton.cdiv(n, BLOCK))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=BLOCK,
                                                         num_warps=4)
    return out.view(*gate_up.shape[:-1], n)
