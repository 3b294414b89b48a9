"""Small sample inputs and the torch reference of each fused kernel op, for its first-use self-check.

The samples take the paths the model's calls take (grouped-query heads, left padding, partial rotary, text
tokens before image tokens) at the release's widths (4096; 32 query / 2 KV heads of 128, half of them rotary),
so the kernels the check compiles are the ones the model then runs (Triton specializes on the block sizes),
on a few rows: a check costs a few launches and well under a megabyte.
"""
from __future__ import annotations

import torch

from . import activations, adaln, decode_attention, norms, rope
from .self_check import Check, kernel_tolerance


def _randn(device, dtype, *shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


WIDTH, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 2, 128


def _rms_norm(device, dtype):
    return _randn(device, dtype, 3, 1, WIDTH), _randn(device, dtype, WIDTH, seed=1), 1e-5


def _add_rms_norm(device, dtype):
    return (_randn(device, dtype, 3, 1, WIDTH), _randn(device, dtype, 3, 1, WIDTH, seed=1, scale=30),
            _randn(device, dtype, WIDTH, seed=2), _randn(device, dtype, WIDTH, seed=3), 1e-5)


def _silu_mul(device, dtype):
    return (_randn(device, dtype, 2, 1, 2 * 1100, scale=3),)  # the second column block is partial


def _decode_attention(device, dtype):
    b, heads, kv_heads, d, rotary, length = 2, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM // 2, 40
    key_valid = torch.ones(b, length, dtype=torch.bool, device=device)
    key_valid[1, :5] = False  # left padding of the second prompt
    return (_randn(device, dtype, b, 1, heads * d), _randn(device, dtype, b, 1, kv_heads * d, seed=1),
            _randn(device, dtype, b, 1, kv_heads * d, seed=2), _randn(device, dtype, b, 1, 1, rotary, seed=3),
            _randn(device, dtype, b, 1, 1, rotary, seed=4), _randn(device, dtype, b, kv_heads, length, d, seed=5),
            _randn(device, dtype, b, kv_heads, length, d, seed=6), key_valid,
            torch.tensor(21, device=device), d ** -0.5)


def _qk_layernorm_rope(device, dtype):
    b, s, h, d, n_text = 2, 7, HEADS, HEAD_DIM, 3
    return (_randn(device, dtype, b, s, h, d), _randn(device, torch.float32, s - n_text, d, seed=1),
            _randn(device, torch.float32, s - n_text, d, seed=2), n_text)


def _modulation(device, dtype, seed):
    return _randn(device, dtype, 2, 1, WIDTH, seed=seed)


def _layernorm_modulate(device, dtype):
    return _randn(device, dtype, 2, 3, WIDTH), _modulation(device, dtype, 1), _modulation(device, dtype, 2)


def _gated_residual(device, dtype):
    return (_randn(device, dtype, 2, 3, WIDTH), _randn(device, dtype, 2, 3, WIDTH, seed=1),
            _modulation(device, dtype, 2))


def _gated_residual_layernorm_modulate(device, dtype):
    return (*_gated_residual(device, dtype), _modulation(device, dtype, 3), _modulation(device, dtype, 4))


KERNELS = {  # op: (reference, sample, indices of the arguments the op writes)
    "rms_norm": (norms.rms_norm_reference, _rms_norm, ()),
    "add_rms_norm": (norms.add_rms_norm_reference, _add_rms_norm, ()),
    "silu_mul": (activations.silu_mul_reference, _silu_mul, ()),
    "decode_attention": (decode_attention.decode_attention_reference, _decode_attention, (5, 6)),
    "qk_layernorm_rope": (rope.qk_layernorm_rope_reference, _qk_layernorm_rope, ()),
    "layernorm_modulate": (adaln.layernorm_modulate_reference, _layernorm_modulate, ()),
    "gated_residual": (adaln.gated_residual_reference, _gated_residual, ()),
    "gated_residual_layernorm_modulate": (adaln.gated_residual_layernorm_modulate_reference,
                                          _gated_residual_layernorm_modulate, ()),
}


def kernel_check(op: str, fused) -> Check:
    reference, sample, mutated = KERNELS[op]
    return Check(fused=fused, reference=reference, sample=sample, tolerance=kernel_tolerance, mutated=mutated)
