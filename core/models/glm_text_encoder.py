"""CogView4-6B's text encoder: GLM-4-9B (transformers ``GlmModel``), run up to its penultimate hidden state.

CogView4 conditions on ``GlmModel(ids, output_hidden_states=True).hidden_states[-2]``: the output of
layer N-2, i.e. the input of the last layer, before the final norm. So the last layer and the final norm
are neither built nor loaded.

Follows ``transformers/models/glm/modeling_glm.py``: pre-norm layers (no sandwich norms, unlike Glm4 and
GLM-Image's AR), q/k/v with bias, ``gate_up_proj`` MLP, and a partial rotary (first half of each head)
in the *interleaved* layout: channel pairs (2i, 2i+1) rotate together with frequency i.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..formats.reading import CheckpointError, ConfigNotInferable
from ..loading import components
from ..loading.configs import known_fields
from ..runtime.attention import attention
from .glm_blocks import GlmDecoderLayer, GroupedQueryProjections


@dataclass
class GlmConfig:
    """The fields of a ``GlmModel`` config.json that the encoder uses (defaults: THUDM/CogView4-6B)."""
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1.5625e-07
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True

    @classmethod
    def from_dict(cls, cfg: dict, source: str) -> "GlmConfig":
        model_type = cfg.get("model_type", "glm")
        if model_type != "glm":
            hint = (" Glm4 (GLM-4-0414) has sandwich norms and is a different model." if model_type == "glm4" else "")
            raise CheckpointError(f"{source}: config model_type is {model_type!r}, expected 'glm' (GLM-4-9B, the "
                                  f"text_encoder of THUDM/CogView4-6B).{hint}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (GLM-4 uses silu).")
        rope = dict(cfg.get("rope_parameters") or {})
        for key in ("rope_theta", "partial_rotary_factor", "rope_type"):  # transformers 4.x kept these at top level
            if key in cfg and key not in rope:
                rope[key] = cfg[key]
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (GLM-4 uses 'default').")
        values = known_fields(cls, cfg)
        values.update({k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope})
        if values.get("head_dim") is None:
            values["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(**values)


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[S, rotary_dim]`` with each frequency repeated for its channel pair (f0, f0, f1, f1, ...)."""
    # on CPU, as the reference
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)
    # The reference rounds cos/sin to the activation dtype before interleaving; so do we.
    cos = freqs.cos().to(dtype).repeat_interleave(2, dim=-1)
    sin = freqs.sin().to(dtype).repeat_interleave(2, dim=-1)
    return cos, sin


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` [B, H, S, D] in (2i, 2i+1) pairs; pass the rest."""
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    rotated_half = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


class GlmAttention(GroupedQueryProjections):
    def __init__(self, cfg: GlmConfig):
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = apply_interleaved_rotary(q, cos, sin), apply_interleaved_rotary(k, cos, sin)
        return self.merge(attention(q, k, v, causal=True, scale=self.head_dim ** -0.5))


class GlmTextEncoder(nn.Module):
    """GLM-4-9B without its last layer and final norm: returns ``hidden_states[-2]`` of ``GlmModel``."""

    def __init__(self, cfg: GlmConfig):
        super().__init__()
        if cfg.num_hidden_layers < 2:
            raise CheckpointError(f"A GLM text encoder needs at least 2 layers, the config has "
                                  f"{cfg.num_hidden_layers}.")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GlmDecoderLayer(GlmAttention(cfg), cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps,
                            sandwich_norms=False)
            for _ in range(cfg.num_hidden_layers - 1))

    def forward(self, input_ids: torch.Tensor, check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        """``input_ids`` [B, S] -> penultimate hidden state [B, S, hidden] in the model's dtype (causal, no mask).
        ``check_interrupt`` (the driving stage's) is called before each layer and may raise to stop."""
        x = self.embed_tokens(input_ids)
        cfg = self.config
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, int(cfg.head_dim * cfg.partial_rotary_factor), cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if check_interrupt is not None:
                check_interrupt()
            x = layer(x, cos, sin)
        return x


LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def infer_config(shapes: dict[str, tuple[int, ...]], source: str) -> GlmConfig:
    """Config of a single-file checkpoint from its tensor shapes; the rest from the real CogView4-6B config."""
    shapes = {k.removeprefix("model."): v for k, v in shapes.items()}
    required = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                "layers.0.mlp.down_proj.weight")
    absent = [k for k in required if k not in shapes]
    if absent:
        raise CheckpointError(f"{source} is not a GLM-4 (GlmModel) checkpoint: it has no {', '.join(absent)}. "
                              f"Choose the text_encoder of THUDM/CogView4-6B.")
    default = GlmConfig()
    vocab, hidden = shapes["embed_tokens.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k)))
    head_dim = default.head_dim
    q_rows, kv_rows = shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ConfigNotInferable(f"{source}: q/k projections of {q_rows}/{kv_rows} rows are not multiples of head_dim "
                                 f"{head_dim}; put the model's config.json beside the file.")
    return GlmConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=shapes["layers.0.mlp.down_proj.weight"][1],
                     num_attention_heads=q_rows // head_dim, num_key_value_heads=kv_rows // head_dim, head_dim=head_dim,
                     attention_bias="layers.0.self_attn.q_proj.bias" in shapes)


def encoder_keys(keys: list[str], cfg: GlmConfig) -> dict[str, str]:
    """``model.`` stripped; the last layer, the final norm and an LM head (all unused by CogView4) left out."""
    unused_layer = cfg.num_hidden_layers - 1
    out = {}
    for key in keys:
        name = key.removeprefix("model.")
        m = LAYER_KEY.match(key)
        if name == "norm.weight" or key.startswith("lm_head.") or (m and int(m.group(1)) == unused_layer):
            continue
        out[key] = name
    return out


def tensor_role(key: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return components.KEEP
    return components.EMBEDDING if key == "embed_tokens.weight" else components.LINEAR


SPEC = components.ComponentSpec(
    name="CogView4 text encoder (GLM-4-9B)", architecture="cogview4_text_encoder", subfolder="text_encoder",
    config_type=GlmConfig, build=GlmTextEncoder, config_from_dict=GlmConfig.from_dict,
    config_from_shapes=infer_config, key_map=encoder_keys, quantize=tensor_role, blocks="layers")


def load_glm_text_encoder(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                          compute_device: torch.device | str | None = None) -> GlmTextEncoder:
    """Load CogView4's GLM-4-9B text encoder from a release root, its ``text_encoder/`` folder, one safetensors
    file or a converted FP8 / GGUF file. The last layer and the final norm are skipped (never read from disk)."""
    return components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
