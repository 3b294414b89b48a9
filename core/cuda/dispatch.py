"""The one place that chooses between the fused kernels and their torch references.

Each fused function is a ``torch.library`` custom op (``glm_image_nodes::*``) with a fake implementation, so
``torch.compile`` traces through it as one opaque node. Its CUDA implementation launches the Triton kernel(s)
(``LAUNCHES`` says how many); on every other device it runs the torch reference, which is also what the
model runs when the fused path is off. The mode travels with each call (``mode=``, from the caller's
``RunOptions.kernels``); ``GLMIMAGE_KERNELS`` in the environment is the default, read when a call names none:

- ``auto``: fused on CUDA tensors of fp32/bf16 where Triton imports and the op passed its first-use self-check
  on that device and dtype (``self_check``: on a failure, the reference and one warning), references elsewhere
  (CPU keeps the reference functions, so CPU results do not change);
- ``reference``: references everywhere;
- ``fused``: the custom ops everywhere, unchecked (a failure raises; on CPU they run the references: what the
  launch-count benchmark and the tests use to exercise the fused code path without a GPU).
"""
from __future__ import annotations

import os

import torch
from torch._library.custom_ops import OPDEFS

from . import activations, adaln, decode_attention, norms, rope, self_check
from .kernel_checks import kernel_check
from .triton_support import HAVE_TRITON, KERNEL_DTYPES

NAMESPACE = "glm_image_nodes"
MODES = ("auto", "reference", "fused")
LAUNCHES = {"decode_attention": 2}  # GPU kernel launches per call where not 1


def default_mode() -> str:
    """The kernel mode of a call that names none: ``GLMIMAGE_KERNELS`` (``auto`` when unset)."""
    mode = os.environ.get("GLMIMAGE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"GLMIMAGE_KERNELS={mode!r}: expected one of {', '.join(MODES)}.")
    return mode


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")


default_mode()  # a bad GLMIMAGE_KERNELS fails on import, before any work


def kernel_tensor(t: torch.Tensor) -> bool:
    """Whether a Triton kernel takes ``t`` (device and dtype)."""
    return t.is_cuda and t.dtype in KERNEL_DTYPES


def kernel_output(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Triton kernel writes ``dtype`` on ``device`` (for ops whose inputs are packed bytes)."""
    return device.type == "cuda" and dtype in KERNEL_DTYPES


def _decide(op: str, mode: str | None, kernels_apply: bool, device: torch.device, dtype: torch.dtype) -> bool:
    mode = mode or default_mode()
    if mode == "fused":
        return True
    if mode == "reference" or not HAVE_TRITON or not kernels_apply:
        return False
    return self_check.passed(op, device, dtype)


def fused_for(device: torch.device, dtype: torch.dtype, op: str, mode: str | None = None) -> bool:
    """``use_fused`` for an op whose inputs are not in the compute dtype (packed weights): whether fused ``op``
    writing ``dtype`` on ``device`` runs under ``mode``."""
    return _decide(op, mode, kernel_output(device, dtype), device, dtype)


def use_fused(*tensors: torch.Tensor, op: str, mode: str | None = None) -> bool:
    """THE decision: whether fused ``op`` runs on ``tensors`` under ``mode`` (the call's ``RunOptions.kernels``;
    None: the default): forced, never, or where the kernels apply and the op passed its self-check on the first
    tensor's device and dtype."""
    return _decide(op, mode, all(kernel_tensor(t) for t in tensors), tensors[0].device, tensors[0].dtype)


def use_checked(op: str, x: torch.Tensor, mode: str | None = None) -> bool:
    """For a fused path outside the kernels (FP8 ``_scaled_mm``, which the caller found supported): forced
    under ``fused``, else whether it passed its self-check on ``x``'s device and dtype."""
    return (mode or default_mode()) == "fused" or self_check.passed(op, x.device, x.dtype)


def _op(name: str, reference, triton_impl, fake, mutates_args=()):
    """Register ``glm_image_nodes::name`` once per process (the pack may be imported under two names)."""
    qualname = f"{NAMESPACE}::{name}"
    if qualname in OPDEFS:
        return OPDEFS[qualname]
    op = torch.library.custom_op(qualname, mutates_args=mutates_args)(reference)
    op.register_fake(fake)
    if HAVE_TRITON:
        op.register_kernel("cuda")(triton_impl)
    return op


def custom_op(name: str, reference, triton_impl, fake):
    """``glm_image_nodes::name`` for fused ops registered above this floor (their references live there)."""
    return _op(name, reference, triton_impl, fake)


def launches_directly(t: torch.Tensor) -> bool:
    return t.is_cuda and HAVE_TRITON and not torch.compiler.is_compiling()


def _fused(name: str, *args):
    """Run fused op ``name``: eagerly on CUDA its Triton launcher directly (the custom-op dispatcher costs more
    host time per call than the launch itself, ~200 calls per AR token); under ``torch.compile``, or on other
    devices, the custom op (one opaque node for the compiler; the reference off CUDA)."""
    if launches_directly(args[0]):
        return TRITON[name](*args)
    return OPS[name](*args)


def _like(x, *_args):
    return torch.empty_like(x)


def _norm_pair(residual, *_args):
    return torch.empty_like(residual), torch.empty_like(residual)


def _silu_mul_fake(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _qk_fake(t, cos, sin, n_text):
    return t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return norms.rms_norm_reference(x, weight, eps)


def _add_rms_norm(residual: torch.Tensor, branch: torch.Tensor, branch_weight: torch.Tensor, next_weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return norms.add_rms_norm_reference(residual, branch, branch_weight, next_weight, eps)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return activations.silu_mul_reference(gate_up)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, key_valid: torch.Tensor, index: torch.Tensor,
                      scale: float) -> torch.Tensor:
    return decode_attention.decode_attention_reference(q, k, v, cos, sin, cache_k, cache_v, key_valid, index, scale)


def _qk_layernorm_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_text: int) -> torch.Tensor:
    return rope.qk_layernorm_rope_reference(t, cos, sin, n_text).contiguous()


def _layernorm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return adaln.layernorm_modulate_reference(x, scale, shift)


def _gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return adaln.gated_residual_reference(x, branch, gate)


def _gated_residual_layernorm_modulate(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                                       shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return adaln.gated_residual_layernorm_modulate_reference(x, branch, gate, scale, shift)


TRITON = {"rms_norm": norms.rms_norm_triton, "add_rms_norm": norms.add_rms_norm_triton,
          "silu_mul": activations.silu_mul_triton, "decode_attention": decode_attention.decode_attention_triton,
          "qk_layernorm_rope": rope.qk_layernorm_rope_triton, "layernorm_modulate": adaln.layernorm_modulate_triton,
          "gated_residual": adaln.gated_residual_triton,
          "gated_residual_layernorm_modulate": adaln.gated_residual_layernorm_modulate_triton}
OPS = {
    "rms_norm": _op("rms_norm", _rms_norm, TRITON["rms_norm"], _like),
    "add_rms_norm": _op("add_rms_norm", _add_rms_norm, TRITON["add_rms_norm"], _norm_pair),
    "silu_mul": _op("silu_mul", _silu_mul, TRITON["silu_mul"], _silu_mul_fake),
    "decode_attention": _op("decode_attention", _decode_attention, TRITON["decode_attention"],
                            lambda q, *_: torch.empty_like(q), mutates_args=("cache_k", "cache_v")),
    "qk_layernorm_rope": _op("qk_layernorm_rope", _qk_layernorm_rope, TRITON["qk_layernorm_rope"], _qk_fake),
    "layernorm_modulate": _op("layernorm_modulate", _layernorm_modulate, TRITON["layernorm_modulate"], _like),
    "gated_residual": _op("gated_residual", _gated_residual, TRITON["gated_residual"], _like),
    "gated_residual_layernorm_modulate": _op("gated_residual_layernorm_modulate", _gated_residual_layernorm_modulate,
                                             TRITON["gated_residual_layernorm_modulate"], _norm_pair),
}

for _name in OPS:  # the check runs what the model would run (looked up at call time)
    self_check.register(_name, kernel_check(_name, lambda *args, _name=_name: _fused(_name, *args)))


# ---- what the models call ----------------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float, mode: str | None = None):
    if use_fused(x, op="rms_norm", mode=mode) and weight.dtype == x.dtype:
        return _fused("rms_norm", x, weight, eps)
    return norms.rms_norm_reference(x, weight, eps)


def add_rms_norm(residual, branch, branch_weight, next_weight, eps: float, mode: str | None = None):
    """``x = residual + rms_norm(branch, branch_weight)``; returns ``(x, rms_norm(x, next_weight))``."""
    if use_fused(residual, op="add_rms_norm", mode=mode) and branch_weight.dtype == next_weight.dtype == residual.dtype:
        return _fused("add_rms_norm", residual, branch, branch_weight, next_weight, eps)
    return norms.add_rms_norm_reference(residual, branch, branch_weight, next_weight, eps)


def silu_mul(gate_up, mode: str | None = None):
    if use_fused(gate_up, op="silu_mul", mode=mode):
        return _fused("silu_mul", gate_up)
    return activations.silu_mul_reference(gate_up)


def decode_attention_fused(x, mode: str | None = None) -> bool:
    """Whether one-token decode attention for activations like ``x`` runs as the fused kernel (RoPE, cache
    write, and masking by itself from ``key_valid`` and the slot index) rather than as SDPA under the
    caller's mask."""
    return use_fused(x, op="decode_attention", mode=mode)


def decode_attention_op(q, k, v, cos, sin, cache_k, cache_v, key_valid, index, scale: float):
    """``[B, 1, heads * D]`` from the projections ``q``/``k``/``v`` ``[B, 1, * D]``; k/v go to slot ``index``."""
    return _fused("decode_attention", q, k, v, cos, sin, cache_k, cache_v, key_valid, index, scale)


def qk_layernorm_rope(t, cos, sin, n_text: int, mode: str | None = None):
    """``t [B, S, H, D]`` -> ``[B, H, S, D]``: per-head LayerNorm, 2D RoPE on tokens ``n_text:``."""
    if use_fused(t, op="qk_layernorm_rope", mode=mode) and t.stride(-1) == 1:
        return _fused("qk_layernorm_rope", t, cos, sin, n_text)
    return rope.qk_layernorm_rope_reference(t, cos, sin, n_text)


def layernorm_modulate(x, scale, shift, mode: str | None = None):
    if use_fused(x, op="layernorm_modulate", mode=mode):
        return _fused("layernorm_modulate", x, scale, shift)
    return adaln.layernorm_modulate_reference(x, scale, shift)


def gated_residual(x, branch, gate, mode: str | None = None):
    if use_fused(x, op="gated_residual", mode=mode):
        return _fused("gated_residual", x, branch, gate)
    return adaln.gated_residual_reference(x, branch, gate)


def gated_residual_layernorm_modulate(x, branch, gate, scale, shift, mode: str | None = None):
    """``x = x + branch * gate``; returns ``(x, LN(x) * (1 + scale) + shift)``."""
    if use_fused(x, op="gated_residual_layernorm_modulate", mode=mode):
        return _fused("gated_residual_layernorm_modulate", x, branch, gate, scale, shift)
    return adaln.gated_residual_layernorm_modulate_reference(x, branch, gate, scale, shift)
