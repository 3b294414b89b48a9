"""Optional Triton, and what every kernel module shares.

Kernels compute in fp32 and round each intermediate the way the torch reference does (a bf16 op on CPU
or GPU computes in fp32 and rounds to nearest-even), so a kernel reproduces the reference's bits, not only
its maths. The rounding is done on the bit pattern: Triton's interpreter truncates fp32 -> bf16 casts, so
this is also what lets the CPU interpreter tests compare bf16 results exactly.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references run instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

if HAVE_TRITON:
    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """``x`` (fp32) rounded to ``DTYPE`` to nearest-even, returned as fp32 (identity for fp32)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x


def block_size(n: int) -> int:
    """The power of two >= n (and >= 16, the smallest tile ``tl.dot`` takes)."""
    return 1 << max(4, (n - 1).bit_length())


def num_warps(elements: int) -> int:
    """Warps for a program that holds ``elements`` fp32 values per tensor: <= 16 values per thread."""
    return max(1, min(16, elements // 512))


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` with a unit last stride, without a copy when its layout allows one."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
