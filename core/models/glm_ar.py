"""The GLM-Image autoregressive model (``vision_language_encoder``, text part only).

GLM-4-0414 decoder: sandwich RMSNorms, GQA with q/k/v biases, a fused ``gate_up_proj`` MLP (gate first),
partial rotate-half M-RoPE on the first half of each head (frequency chunks [8, 12, 12] take the t/h/w
position, not interleaved), and an ``lm_head`` over the 16512-id vision vocabulary only, so a sampled index is
the vocabulary id that is fed back through the shared ``embed_tokens``.

Checkpoint keys ``model.language_model.*`` map to this module with that prefix stripped; ``lm_head.weight`` is
kept. The vision encoder and VQ (``model.visual.*``, ``model.vqmodel.*``) are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cuda import dispatch
from ..cuda.rope import apply_partial_rope
from ..formats.layers import compute_dtype
from ..formats.reading import CheckpointError, ConfigNotInferable
from ..loading import components
from ..runtime.attention import attention, cached_decode_attention
from ..runtime.devices import compute_device
from ..runtime.options import RunOptions
from .glm_blocks import GlmDecoderLayer, GroupedQueryProjections, RMSNorm

PREFIX = "model.language_model."
HEAD = "lm_head."
FP16_REASON = "GLM-4 hidden activations exceed the float16 range (the reference runs in bfloat16)."

# text_config of the release (zai-org/GLM-Image vision_language_encoder/config.json)
DEFAULT_TEXT_CONFIG = {
    "vocab_size": 168064, "vision_vocab_size": 16512, "hidden_size": 4096, "intermediate_size": 13696,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "rms_norm_eps": 1e-5, "attention_bias": True,
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
}


@dataclass
class ARConfig:
    vocab_size: int
    vision_vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    rope_theta: float
    rotary_dim: int
    mrope_section: tuple[int, ...]
    max_position_embeddings: int = 131072

    @classmethod
    def from_text_config(cls, cfg: dict) -> "ARConfig":
        d = {**DEFAULT_TEXT_CONFIG, **{k: v for k, v in cfg.items() if v is not None}}
        rope = {**DEFAULT_TEXT_CONFIG["rope_parameters"], **(d.get("rope_parameters") or {})}
        for key in ("rope_theta", "partial_rotary_factor"):  # older configs keep these at the top level
            if key in cfg and key not in (cfg.get("rope_parameters") or {}):
                rope[key] = cfg[key]
        head_dim = cfg.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        rotary_dim = int(head_dim * rope["partial_rotary_factor"])
        section = tuple(rope.get("mrope_section") or (8, 12, 12))
        if sum(section) * 2 != rotary_dim:
            raise CheckpointError(f"text_config: mrope_section {list(section)} must sum to half the rotary "
                                  f"dimension ({rotary_dim // 2}).")
        return cls(vocab_size=d["vocab_size"], vision_vocab_size=d["vision_vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                   num_heads=d["num_attention_heads"], num_kv_heads=d["num_key_value_heads"], head_dim=head_dim,
                   rms_norm_eps=d["rms_norm_eps"], attention_bias=d["attention_bias"],
                   rope_theta=float(rope["rope_theta"]), rotary_dim=rotary_dim, mrope_section=section,
                   max_position_embeddings=int(d.get("max_position_embeddings") or 131072))


def mrope_cos_sin(cfg: ARConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B,1,L,rotary_dim]`` from 3D positions ``[3,B,L]`` (t, h, w)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32,
                                                      device=position_ids.device) / cfg.rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [3,B,L,rotary_dim/2]
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(cfg.mrope_section, dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated keys/values ``[B, kv_heads, max_len, head_dim]`` per layer.

    ``key_valid`` [B, max_len] marks the slots a query may attend to (False for left padding).
    """

    def __init__(self, cfg: ARConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 attention_mask: torch.Tensor | None = None):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        if attention_mask is not None:
            self.key_valid[:, :attention_mask.shape[1]] = attention_mask.to(device=device, dtype=torch.bool)

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


class Attention(GroupedQueryProjections):
    def __init__(self, cfg: ARConfig):
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias)

    def forward(self, x, cos, sin, cache_k, cache_v, start, mask, key_valid, options=None):
        n = x.shape[1]
        scale = self.head_dim ** -0.5
        if isinstance(start, int):  # prefill / chunk: attend to the filled part of the cache
            q, k, v = self.project(x)
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
            cache_k[:, :, start:start + n] = k
            cache_v[:, :, start:start + n] = v
            out = attention(q, cache_k[:, :, :start + n], cache_v[:, :, :start + n], causal=mask is None, mask=mask,
                            scale=scale, options=options)
            return self.merge(out)
        # decode with a device-side index: static shapes over the whole cache
        return self.o_proj(cached_decode_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, cache_k,
                                                   cache_v, mask=mask, key_valid=key_valid, index=start, scale=scale,
                                                   options=options))


class GlmImageAR(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GlmDecoderLayer(Attention(cfg), cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps,
                            sandwich_norms=True)
            for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vision_vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        # where the weights are; a stage computes on the device its caller passes (block swap, partial loads)
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the compute dtype, not the stored weight's: a GGUF from llama-quantize packs every 2-D weight (uint8)
        return compute_dtype(self.lm_head)

    def new_cache(self, batch: int, max_len: int, attention_mask: torch.Tensor | None = None,
                  device: torch.device | None = None) -> KVCache:
        """An empty cache on ``device`` (the compute device; None: where the weights are)."""
        return KVCache(self.config, batch, max_len, self.dtype, compute_device(device, self.device), attention_mask)

    def generation_bytes(self, batch: int, prompt_len: int, cache_len: int, padded: bool) -> int:
        """Memory a generation allocates beside the weights: the KV cache of ``cache_len`` slots, the
        prefill's peak activations (hidden states, q/k/v, the fused MLP) and, for a left-padded batch, its
        boolean attention mask."""
        c = self.config
        size = self.dtype.itemsize
        cache = 2 * c.num_layers * batch * c.num_kv_heads * cache_len * c.head_dim * size
        per_token = 4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.intermediate_size
        mask = batch * prompt_len * prompt_len if padded else 0
        return cache + batch * prompt_len * per_token * size + mask

    def _mask(self, cache: KVCache, start: int | torch.Tensor, n: int) -> torch.Tensor | None:
        device = cache.key_valid.device  # the compute device the cache was made on
        if isinstance(start, int):
            if start == 0 and not cache.padded:
                return None  # plain causal
            keys = torch.arange(start + n, device=device)
            valid = cache.key_valid[:, :start + n]
        else:
            keys = torch.arange(cache.max_len, device=device)
            valid = cache.key_valid
        queries = start + torch.arange(n, device=device)
        allowed = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :]
        # a padding query sees nothing valid; let it see itself so its (unused) row stays finite
        allowed = allowed | (keys[None, :] == queries[:, None])[None]
        return allowed[:, None]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: KVCache,
                start: int | torch.Tensor, last_only: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                options: RunOptions | None = None) -> torch.Tensor:
        """Logits (float32) ``[B, L, vision_vocab]`` for ``input_ids`` [B,L] at cache slots ``start..start+L``
        (``[B, 1, vision_vocab]`` of the last position with ``last_only``: a long prefill needs no more).

        ``position_ids``: M-RoPE positions [3,B,L]. ``start``: a Python int (prefill, attends to the cache
        up to the new tokens) or a 0-dim device tensor (decode: static shapes, attends to the whole cache
        under a mask; suitable for CUDA-graph capture). ``rope``: the ``mrope_cos_sin`` of ``position_ids``,
        precomputed (a decode loop computes every step's at once). ``options``: the attention kernel and the
        fused-kernel mode (``RunOptions``; None: the defaults).
        """
        mode = options.kernels if options is not None else None
        n = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = rope if rope is not None else mrope_cos_sin(self.config, position_ids, x.dtype)
        fused_decode = not isinstance(start, int) and n == 1 and dispatch.decode_attention_fused(x, mode)
        mask = None if fused_decode else self._mask(cache, start, n)  # the fused kernel masks by itself
        h = self.layers[0].input_layernorm(x, mode)
        nexts = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm, k, v in zip(self.layers, nexts, cache.k, cache.v):
            x, h = layer.forward_chained(x, h, next_norm, mode, cos, sin, k, v, start, mask, cache.key_valid, options)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()


# ---- loading ---------------------------------------------------------------------------------------------

def text_config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> ARConfig:
    """The config of a single-file checkpoint from its tensor shapes; head_dim and RoPE use the release values."""
    layer = PREFIX + "layers.0."
    wanted = [PREFIX + "embed_tokens.weight", "lm_head.weight", layer + "self_attn.q_proj.weight",
              layer + "self_attn.k_proj.weight", layer + "mlp.down_proj.weight"]
    missing = [k for k in wanted if k not in shapes]
    if missing:
        raise ConfigNotInferable(f"{source}: cannot infer the AR config, missing {', '.join(missing)}. "
                                 f"Put the release's vision_language_encoder/config.json beside the weights.")
    head_dim = DEFAULT_TEXT_CONFIG["head_dim"]
    q_rows, k_rows = shapes[layer + "self_attn.q_proj.weight"][0], shapes[layer + "self_attn.k_proj.weight"][0]
    if q_rows % head_dim or k_rows % head_dim:
        raise CheckpointError(f"{source}: q/k projections ({q_rows}, {k_rows} rows) are not multiples of head_dim "
                              f"{head_dim}; provide the config.json of this checkpoint.")
    layers = {int(k[len(PREFIX) + len("layers."):].split(".")[0]) for k in shapes if k.startswith(PREFIX + "layers.")}
    vocab, hidden = shapes[PREFIX + "embed_tokens.weight"]
    return ARConfig.from_text_config({
        **DEFAULT_TEXT_CONFIG, "vocab_size": vocab, "hidden_size": hidden,
        "vision_vocab_size": shapes["lm_head.weight"][0],
        "intermediate_size": shapes[layer + "mlp.down_proj.weight"][1], "num_hidden_layers": len(layers),
        "num_attention_heads": q_rows // head_dim, "num_key_value_heads": k_rows // head_dim,
        "attention_bias": (layer + "self_attn.q_proj.bias") in shapes})


def check_language_model(keys: list[str], source: str) -> None:
    if not any(k.startswith(PREFIX) for k in keys) or "lm_head.weight" not in keys:
        raise CheckpointError(f"{source} has no GLM-Image language-model weights (expected keys '{PREFIX}*' and "
                              f"'lm_head.weight'). Choose the release folder or its vision_language_encoder/ "
                              f"weights, not another component.")


def language_model_keys(keys: list[str], config: ARConfig) -> dict[str, str]:
    """Only ``model.language_model.*`` (prefix stripped) and ``lm_head.*``: never the vision encoder or VQ."""
    return {k: (k if k.startswith(HEAD) else k[len(PREFIX):]) for k in keys
            if k.startswith(PREFIX) or k.startswith(HEAD)}


def tensor_role(key: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2 or key.startswith(HEAD):
        return components.KEEP  # the vision head decides every token: kept in the source precision
    if key == "embed_tokens.weight":
        return components.EMBEDDING
    return components.LINEAR


SPEC = components.ComponentSpec(
    name="The GLM-Image AR model", architecture="glm_image_ar", subfolder="vision_language_encoder",
    config_type=ARConfig, build=GlmImageAR,
    config_from_dict=lambda cfg, source: ARConfig.from_text_config(cfg), config_from_shapes=text_config_from_shapes,
    key_map=language_model_keys, fp16_reason=FP16_REASON, config_key="text_config", config_beside_file=True,
    check=check_language_model, quantize=tensor_role, blocks="layers")


def load_ar_model(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                  compute_device: torch.device | str | None = None) -> GlmImageAR:
    """Load the AR model from a release root, its ``vision_language_encoder/`` folder, one safetensors file or a
    converted FP8 / GGUF file. Only ``model.language_model.*`` and ``lm_head.*`` are read. ``dtype``: auto (bf16
    on GPU, fp32 on CPU), bf16, fp32 or fp8_e4m3fn; fp16 is refused."""
    return components.load_component(SPEC, path, dtype, device, compute_device=compute_device)
