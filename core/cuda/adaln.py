"""The DiT block's adaLN epilogues: LayerNorm + modulate, and the gated residual, alone or fused.

Each DiT stream does ``LN(x) * (1 + scale) + shift`` before attention, ``x + out * gate`` followed by the
same modulation before the feed-forward, and a last ``x + out * gate`` after it: three passes over the
residual stream instead of eight. Modulation vectors are ``[B, 1, D]`` (views into the adaLN output).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import HAVE_TRITON, block_size, num_warps

if HAVE_TRITON:
    from .triton_support import round_to, tl, triton

LN_EPS = 1e-5


def layernorm_modulate_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) * (1 + scale) + shift


def gated_residual_reference(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + branch * gate


def gated_residual_layernorm_modulate_reference(x, branch, gate, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    x = gated_residual_reference(x, branch, gate)
    return x, layernorm_modulate_reference(x, scale, shift)


if HAVE_TRITON:
    @triton.jit
    def adaln_kernel(x_ptr, branch_ptr, gate_ptr, scale_ptr, shift_ptr, x_out_ptr, out_ptr, seq, n, stride_x,
                     stride_branch, stride_out, smod_gate, smod_scale, smod_shift, eps,
                     GATED: tl.constexpr, MODULATE: tl.constexpr, BLOCK: tl.constexpr):
        """GATED: ``x = x + branch * gate`` (stored to x_out); MODULATE: ``out = LN(x) * (1 + scale) + shift``."""
        row = tl.program_id(0).to(tl.int64)  # rows * width passes 2^31 at 2048x2048 x 16 images with CFG
        b = row // seq
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            branch = tl.load(branch_ptr + row * stride_branch + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + b * smod_gate + offs, mask=mask, other=0.0).to(tl.float32)
            x = round_to(x + round_to(branch * gate, dtype), dtype)
            tl.store(x_out_ptr + row * stride_out + offs, x.to(dtype), mask=mask)
        if MODULATE:
            mean = tl.sum(x, axis=0) / n
            xc = tl.where(mask, x - mean, 0.0)
            normed = round_to(xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / n + eps), dtype)
            scale = round_to(1.0 + tl.load(scale_ptr + b * smod_scale + offs, mask=mask, other=0.0).to(tl.float32),
                             dtype)
            shift = tl.load(shift_ptr + b * smod_shift + offs, mask=mask, other=0.0).to(tl.float32)
            out = round_to(round_to(normed * scale, dtype) + shift, dtype)
            tl.store(out_ptr + row * stride_out + offs, out.to(dtype), mask=mask)


def _launch(x, branch, gate, scale, shift, gated: bool, modulate: bool):
    b, s, n = x.shape
    x = x if x.stride(-1) == 1 and x.is_contiguous() else x.contiguous()
    branch = x if branch is None else branch.contiguous()
    x_out = torch.empty_like(x) if gated else x
    out = torch.empty_like(x) if modulate else x_out
    gate, scale, shift = (m if m is not None else x for m in (gate, scale, shift))
    block = block_size(n)
    # modulation vectors [B, 1, D] are views into the adaLN output: only their batch stride differs
    adaln_kernel[(b * s,)](x, branch, gate, scale, shift, x_out, out, s, n, x.stride(1), branch.stride(1),
                           x_out.stride(1), gate.stride(0), scale.stride(0), shift.stride(0), LN_EPS,
                           GATED=gated, MODULATE=modulate, BLOCK=block, num_warps=num_warps(block))
    return x_out, out


def layernorm_modulate_triton(x, scale, shift):
    return _launch(x, None, None, scale, shift, gated=False, modulate=True)[1]


def gated_residual_triton(x, branch, gate):
    return _launch(x, branch, gate, None, None, gated=True, modulate=False)[0]


def gated_residual_layernorm_modulate_triton(x, branch, gate, scale, shift):
    return _launch(x, branch, gate, scale, shift, gated=True, modulate=True)
