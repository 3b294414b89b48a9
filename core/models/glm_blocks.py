"""Building blocks of the GLM family shared by GLM-Image's AR model (GLM-4-0414) and CogView4's GLM-4-9B
text encoder: the RMSNorm, the fused ``gate_up_proj`` MLP and grouped-query q/k/v/o projections."""
from __future__ import annotations

import torch
from torch import nn

from ..cuda import dispatch


def _near(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A norm weight read directly (not through the norm's forward) on ``x``'s device: a block swap or ComfyUI's
    partial load may have left it on the offload device."""
    return weight if weight.device == x.device else weight.to(x.device, non_blocking=True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps, mode)


class MLP(nn.Module):
    """``down_proj(up * silu(gate))`` with gate and up fused in one ``gate_up_proj`` (gate first)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, mode: str | None = None):
        return self.down_proj(dispatch.silu_mul(self.gate_up_proj(x), mode))


class GroupedQueryProjections(nn.Module):
    """``q_proj``/``k_proj``/``v_proj`` (bias optional) and ``o_proj`` (no bias) of grouped-query attention."""

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, S, hidden]`` -> q ``[B, heads, S, D]``, k and v ``[B, kv_heads, S, D]``."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, heads, S, D]`` -> ``o_proj`` of ``[B, S, heads * D]``."""
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class GlmDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals; ``sandwich_norms`` adds GLM-4-0414's norms after each of them
    (``post_self_attn_layernorm``, ``post_mlp_layernorm``). ``attention_args`` go to ``self_attn`` as they are."""

    def __init__(self, attention: nn.Module, hidden_size: int, intermediate_size: int, eps: float,
                 sandwich_norms: bool):
        super().__init__()
        self.self_attn = attention
        self.mlp = MLP(hidden_size, intermediate_size)
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(hidden_size, eps) if sandwich_norms else nn.Identity()
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(hidden_size, eps) if sandwich_norms else nn.Identity()

    def forward(self, x: torch.Tensor, *attention_args) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), *attention_args))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))

    def forward_chained(self, x: torch.Tensor, normed: torch.Tensor, next_norm: RMSNorm, mode: str | None,
                        *attention_args) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for sandwich-norm layers given ``normed = input_layernorm(x)``; returns the new ``x`` and
        ``next_norm(x)`` (the next layer's input norm, or the final norm), each norm seam one fused pass.
        ``mode``: the fused-kernel mode (``dispatch.use_fused``)."""
        eps = self.input_layernorm.eps
        a = self.self_attn(normed, *attention_args)
        x, h = dispatch.add_rms_norm(x, a, _near(self.post_self_attn_layernorm.weight, x),
                                     _near(self.post_attention_layernorm.weight, x), eps, mode)
        return dispatch.add_rms_norm(x, self.mlp(h, mode), _near(self.post_mlp_layernorm.weight, x),
                                     _near(next_norm.weight, x), eps, mode)
