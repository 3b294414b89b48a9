"""T5 encoder stack (transformers ``T5EncoderModel``), with its checkpoint key names.

Pre-norm blocks with an RMS norm (no mean subtraction, statistics in fp32), unscaled attention
plus a relative position bias computed by block 0 and shared by all blocks, gated feed-forward.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.layers import compute_dtype
from ..formats.reading import CheckpointError
from ..loading import components
from ..loading.configs import known_fields
from ..runtime.attention import attention

FP16_REASON = "T5 activations exceed the fp16 range (the feed-forward overflows to inf/NaN)."


@dataclass
class T5Config:
    """The fields of a transformers ``T5Config`` the encoder uses (defaults: GLM-Image's text_encoder/config.json,
    used where a single file does not say)."""
    d_model: int = 1472
    d_ff: int = 3584
    d_kv: int = 64
    num_heads: int = 6
    num_layers: int = 12
    vocab_size: int = 384
    feed_forward_proj: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "T5Config":
        if config.get("model_type", "t5") != "t5":
            raise CheckpointError(f"{source}: its config is a {config['model_type']!r} config, not T5; choose the "
                                  f"text_encoder folder of the GLM-Image release.")
        values = cls(**known_fields(cls, config))
        activation_name(values)  # an unsupported feed-forward fails here, before any weight is read
        return values


ACTIVATIONS = {
    # transformers' NewGELUActivation, written out so bf16 rounding matches it
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation_name(config: T5Config) -> str:
    """The gated activation named by ``feed_forward_proj`` (T5Config's rule: ``gated-gelu`` means ``gelu_new``)."""
    proj = config.feed_forward_proj
    parts = proj.split("-")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if parts[0] != "gated" or act not in ACTIVATIONS:
        raise CheckpointError(f"T5 feed_forward_proj {proj!r} is not supported; only gated feed-forwards "
                              f"(gated-gelu, gated-silu) are, as in Glyph-ByT5 / T5 v1.1.")
    return act


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half per direction, exact below ``num_buckets // 4``, log-spaced up to
    ``max_distance``."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    relative_position = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        d_model, inner = config.d_model, config.num_heads * config.d_kv
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        if has_relative_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """``[1, H, S, S]`` additive bias from the key-minus-query distance."""
        pos = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, mask=bias, scale=1.0)  # T5 folds the scale into its weights
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[activation_name(config)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo((self.act(self.wi_0(x)) * self.wi_1(x)).to(compute_dtype(self.wo)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(config, i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """``T5EncoderModel`` with its state-dict names; ``forward`` returns ``last_hidden_state`` ``[B, S, D]``.

    The input embedding is ``shared`` (checkpoints may instead hold its tied alias ``encoder.embed_tokens``).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, self.config.d_model)
        self.encoder = T5Stack(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.shared(input_ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device)
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def encoder_state_keys(keys: list[str], config: T5Config | None = None) -> dict[str, str]:
    """Checkpoint key -> ``T5Encoder`` key: decoder and LM-head keys are dropped, the embedding alias is mapped."""
    out = {k: k for k in keys if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    if "shared.weight" in keys:
        out["shared.weight"] = "shared.weight"
    elif "encoder.embed_tokens.weight" in keys:
        out["encoder.embed_tokens.weight"] = "shared.weight"
    return out


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> T5Config:
    """A T5 encoder config from the tensor shapes of a checkpoint."""
    shapes = {encoder_state_keys(list(shapes)).get(k, k): s for k, s in shapes.items()}
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    q_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    wi_key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    for key in ("shared.weight", bias_key, q_key, wi_key):
        if key not in shapes:
            raise CheckpointError(f"{source}: no tensor {key}; this is not a gated T5 encoder checkpoint "
                                  f"(expected the Glyph-ByT5 text_encoder of the GLM-Image release).")
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes[bias_key]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    return T5Config(vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
                    num_layers=layers, d_kv=shapes[q_key][0] // heads, d_ff=shapes[wi_key][0])


def tensor_role(key: str, shape: tuple[int, ...]) -> str:
    """The block projections are quantized; the byte embedding and the position bias are tiny and kept."""
    if len(shape) == 2 and key.startswith("encoder.block.") and "relative_attention_bias" not in key:
        return components.LINEAR
    return components.KEEP


SPEC = components.ComponentSpec(
    name="Glyph-ByT5 encoder (T5)", architecture="glyph_byt5", subfolder="text_encoder", config_type=T5Config,
    build=T5Encoder, config_from_dict=T5Config.from_dict, config_from_shapes=config_from_shapes,
    key_map=encoder_state_keys, fp16_reason=FP16_REASON, quantize=tensor_role)


def load_glyph_encoder(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                       compute_device: torch.device | str | None = None) -> T5Encoder:
    """The Glyph-ByT5 T5 encoder from a release root, its ``text_encoder/`` folder, a single safetensors file or
    a converted FP8 / GGUF file."""
    return components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
