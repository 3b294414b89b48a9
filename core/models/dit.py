"""The DiT trunk shared by the GLM-Image decoder and CogView4-6B (diffusers ``GlmImageTransformer2DModel`` and
``CogView4Transformer2DModel`` share their block code), with the loading steps both use.

One block serves two streams: the text stream (glyph embeddings for GLM-Image, GLM-4 hidden states for
CogView4) and the image stream (2x2 patches of the latent). Each stream has its own adaLN modulation, but the
attention (joint over ``[text; image]``) and the feed-forward weights are shared. RoPE touches the image part
only. Editing adds a reference K/V cache: references are run once in ``write`` mode, the conditional branch
then attends over ``[cached references; glyph; target]`` in ``read`` mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cuda import dispatch
from ..formats.layers import compute_dtype
from ..formats.reading import CheckpointError, ConfigNotInferable
from ..loading import components
from ..loading.configs import known_fields
from ..runtime.attention import attention
from ..runtime.options import RunOptions
from .step_cache import BranchCache

FP16_REASON = ("the DiT's residual stream exceeds the fp16 range (the reference runs it in bf16 or fp32) and the "
               "images come out as NaN or noise.")
KV_MODES = ("write", "read", "skip")

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DiTConfig:
    """The trunk's fields of a diffusers transformer config.json (defaults: the GLM-Image release's)."""
    CLASS_NAME: ClassVar[str] = ""
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    text_embed_dim: int = 1472
    time_embed_dim: int = 512
    condition_dim: int = 256

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "DiTConfig":
        """The fields of ``config`` this class knows (the rest, like ``_diffusers_version``, are ignored);
        a ``_class_name`` of another model is refused."""
        found = config.get("_class_name")
        if found is not None and cls.CLASS_NAME and found != cls.CLASS_NAME:
            raise CheckpointError(f"{source}: the config describes a {found}, not a {cls.CLASS_NAME}. Choose the "
                                  f"matching loader or the right component folder.")
        return cls(**known_fields(cls, config))


# ---- embeddings ------------------------------------------------------------------------------------------------
def sincos(values: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: ``[cos, sin]``, fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TwoLayerMLP(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeConditionEmbed(nn.Module):
    """``SiLU(MLP(sincos(t)) + MLP(cat(sincos(c) for c in conditions)))``; each condition is ``[B, 2]``."""

    def __init__(self, dim: int, time_proj_dim: int, condition_dim: int, num_conditions: int):
        super().__init__()
        self.time_proj_dim = time_proj_dim
        self.condition_dim = condition_dim
        self.timestep_embedder = TwoLayerMLP(time_proj_dim, dim)
        self.condition_embedder = TwoLayerMLP(2 * num_conditions * condition_dim, dim)

    def forward(self, timestep: torch.Tensor, conditions: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        t = sincos(timestep, self.time_proj_dim)
        c = torch.cat([sincos(x.flatten(), self.condition_dim).view(x.shape[0], -1) for x in conditions], dim=1)
        return F.silu(self.timestep_embedder(t.to(dtype)) + self.condition_embedder(c.to(dtype)))


class ActivatedLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.proj(x))


class FeedForward(nn.Module):
    """diffusers ``FeedForward``: ``net.0.proj`` + activation, ``net.1`` (dropout, no weights), ``net.2``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net = nn.Sequential(ActivatedLinear(in_dim, hidden_dim, activation), nn.Identity(),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# ---- patches and RoPE ------------------------------------------------------------------------------------------
def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/p)(w/p), C*p*p]``, channel-major inside a patch."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """``[B, (h/p)(w/p), C*p*p] -> [B, C, h, w]``."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, -1, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)


def rope_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[rows*cols, head_dim]`` (fp32) for a row-major grid; frequencies laid out ``[h, w, h, w]``.

    ``rows``/``cols`` are the per-axis position indices (raw for GLM-Image, stretched for CogView4).
    """
    axis = head_dim // 2
    exponents = torch.arange(0, axis, 2, dtype=torch.float32, device=rows.device)[: axis // 2] / axis
    inv_freq = 1.0 / (10000.0 ** exponents)
    fh = torch.outer(rows.float(), inv_freq)[:, None].expand(len(rows), len(cols), -1)
    fw = torch.outer(cols.float(), inv_freq)[None, :].expand(len(rows), len(cols), -1)
    freqs = torch.cat([fh, fw], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(len(rows) * len(cols), -1)
    return freqs.cos(), freqs.sin()


# ---- the block -------------------------------------------------------------------------------------------------
class AdaLNZero(nn.Module):
    """``norm1``: one Linear giving 12 modulation vectors (image and text interleaved, see ``DiTBlock``)."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 12 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m.unsqueeze(1) for m in self.linear(temb).chunk(12, dim=1))


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_pad: tuple[int, ...],
                     options: RunOptions | None = None) -> torch.Tensor:
    """Attention for a batch whose text streams are left-padded: sample ``i``'s first ``text_pad[i]`` keys are
    padding. Each run of samples with the same padding attends over its real keys only (a slice, no mask), so
    every real token sees exactly the keys of its unpadded forward; padding queries see the same keys and are
    dropped later."""
    outputs, start = [], 0
    while start < len(text_pad):
        stop = start
        while stop < len(text_pad) and text_pad[stop] == text_pad[start]:
            stop += 1
        pad = text_pad[start]
        outputs.append(attention(q[start:stop], k[start:stop, :, pad:], v[start:stop, :, pad:], options=options))
        start = stop
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, x: torch.Tensor, text: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                prefix_kv: KV | None = None, keep_kv: bool = False, text_pad: tuple[int, ...] | None = None,
                options: RunOptions | None = None) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """Image and text outputs, and this layer's post-RoPE K/V ``[B, H, S, D]`` when ``keep_kv``.
        ``prefix_kv``: reference K/V attended before the text; ``text_pad``: left padding per sample."""
        n_text = text.shape[1]
        mode = options.kernels if options is not None else None
        s = torch.cat([text, x], dim=1)
        q = dispatch.qk_layernorm_rope(self.to_q(s).unflatten(2, (self.heads, self.head_dim)), *rope, n_text, mode)
        k = dispatch.qk_layernorm_rope(self.to_k(s).unflatten(2, (self.heads, self.head_dim)), *rope, n_text, mode)
        v = self.to_v(s).unflatten(2, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D]
        kept = (k, v) if keep_kv else None
        if prefix_kv is not None:
            ck, cv = prefix_kv
            if ck.shape[0] != k.shape[0]:
                if ck.shape[0] != 1:
                    raise ValueError(f"The reference cache holds {ck.shape[0]} samples but the batch has "
                                     f"{k.shape[0]}; write it with batch 1 (shared) or the same batch.")
                ck, cv = ck.expand(k.shape[0], -1, -1, -1), cv.expand(k.shape[0], -1, -1, -1)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        if text_pad is not None:
            if prefix_kv is not None:
                raise ValueError("A padded text batch cannot read a reference cache.")
            o = padded_attention(q, k, v, text_pad, options)
        else:
            o = attention(q, k, v, options=options)
        o = self.to_out[0](o.transpose(1, 2).flatten(2, 3))
        return o[:, n_text:], o[:, :n_text], kept


class DiTBlock(nn.Module):
    """CogView4 / GLM-Image transformer block; ``x`` is the image stream, ``text`` the text stream."""

    def __init__(self, dim: int, heads: int, head_dim: int, time_dim: int):
        super().__init__()
        self.norm1 = AdaLNZero(time_dim, dim)
        self.attn1 = JointAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim, 4 * dim, dim, gelu_tanh)

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                prefix_kv: KV | None = None, keep_kv: bool = False, text_pad: tuple[int, ...] | None = None,
                options: RunOptions | None = None) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        (shift, c_shift, scale, c_scale, gate, c_gate,
         shift_ff, c_shift_ff, scale_ff, c_scale_ff, gate_ff, c_gate_ff) = self.norm1(temb)
        mode = options.kernels if options is not None else None
        nx = dispatch.layernorm_modulate(x, scale, shift, mode)
        nt = dispatch.layernorm_modulate(text, c_scale, c_shift, mode)
        ax, at, kv = self.attn1(nx, nt, rope, prefix_kv, keep_kv, text_pad, options)
        x, nx = dispatch.gated_residual_layernorm_modulate(x, ax, gate, scale_ff, shift_ff, mode)
        text, nt = dispatch.gated_residual_layernorm_modulate(text, at, c_gate, c_scale_ff, c_shift_ff, mode)
        return (dispatch.gated_residual(x, self.ff(nx), gate_ff, mode),
                dispatch.gated_residual(text, self.ff(nt), c_gate_ff, mode), kv)


_compiled_block = None


def compiled_block_forward():
    """``DiTBlock.forward`` under ``torch.compile``: one compiled graph serves every block (the module is an
    input), recompiled only for new shapes. Not fullgraph: an optional attention kernel is a graph break."""
    global _compiled_block
    if _compiled_block is None:
        _compiled_block = torch.compile(DiTBlock.forward, dynamic=False)
    return _compiled_block


class FinalAdaLN(nn.Module):
    """``norm_out``: ``LN(x) * (1 + scale) + shift`` with ``(scale, shift) = linear(temb)`` (no SiLU here)."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb.to(x.dtype)).chunk(2, dim=1)
        return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]


# ---- reference K/V cache ---------------------------------------------------------------------------------------
class ReferenceKVCache:
    """Post-qk-norm, post-RoPE keys and values of reference images, per layer, as ``[Bc, H, S_refs, D]``.

    Fill it with one ``write`` forward per reference (each reference attends only to itself; their K/V are
    concatenated). ``read`` prepends the cache to the keys/values of every query; a cache written with batch 1
    is shared by the whole batch.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_tokens(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)

    def prefix(self, layer: int) -> KV | None:
        return None if self.keys[layer] is None else (self.keys[layer], self.values[layer])


# ---- the trunk -------------------------------------------------------------------------------------------------
class DiTTrunk(nn.Module):
    """What GLM-Image and CogView4 share: ``transformer_blocks``, ``norm_out`` and ``proj_out``.

    A subclass builds its input embeddings, then calls ``add_trunk`` (so the parameters keep the release's
    order), and its ``forward`` runs ``run_blocks`` and ``output``.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.dim = config.num_attention_heads * config.attention_head_dim
        self.patch_size = config.patch_size
        self.head_dim = config.attention_head_dim

    def patches(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents -> ``[B, (h/p)(w/p), C*p*p]`` patches."""
        return patchify(latents, self.patch_size)

    def rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE cos/sin of the ``rows`` x ``cols`` patch grid (per-axis position indices)."""
        return rope_2d(rows, cols, self.head_dim)

    def add_trunk(self) -> None:
        c = self.config
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(self.dim, c.num_attention_heads, c.attention_head_dim, c.time_embed_dim)
            for _ in range(c.num_layers))
        self.norm_out = FinalAdaLN(c.time_embed_dim, self.dim)
        self.proj_out = nn.Linear(self.dim, c.patch_size ** 2 * c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        # the compute dtype, not the stored weight's: a GGUF from llama-quantize packs every 2-D weight (uint8)
        return compute_dtype(self.proj_out)

    @property
    def device(self) -> torch.device:
        # where the weights are; a stage computes on the device its caller passes (block swap, partial loads)
        return self.proj_out.weight.device

    @property
    def num_layers(self) -> int:
        return len(self.transformer_blocks)

    def run_blocks(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], kv_cache: ReferenceKVCache | None = None,
                   kv_mode: str | None = None, text_pad: tuple[int, ...] | None = None,
                   step_cache: BranchCache | None = None, options: RunOptions | None = None) -> torch.Tensor:
        """The image stream after every block.

        ``kv_mode``: ``write`` appends each layer's K/V to ``kv_cache``, ``read`` attends over it first.
        ``text_pad``: left padding of each sample's text stream. ``step_cache``: after the first block, reuse
        the rest of the blocks' residual from an earlier step when the first block's output barely moved.
        ``options``: the attention kernel and kernel mode of every block; ``options.compile`` runs each block
        through one regional ``torch.compile``.
        """
        compiled = compiled_block_forward() if options is not None and options.compile else None
        x_in = x
        for i, block in enumerate(self.transformer_blocks):
            prefix = kv_cache.prefix(i) if kv_cache is not None and kv_mode == "read" else None
            args = (x, text, temb, rope, prefix, kv_mode == "write", text_pad, options)
            x, text, kv = compiled(block, *args) if compiled is not None else block(*args)
            if kv_mode == "write":
                kv_cache.append(i, *kv)
            if i == 0 and step_cache is not None:
                first, x_first = x - x_in, x
                if step_cache.reusable(first):
                    return x + step_cache.rest
        if step_cache is not None:
            step_cache.store(first, x - x_first)
        return x

    def output(self, x: torch.Tensor, temb: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Final adaLN and projection back to latent patches: ``[B, C, h, w]``."""
        return unpatchify(self.proj_out(self.norm_out(x, temb)), h, w, self.patch_size)


# ---- loading ---------------------------------------------------------------------------------------------------
def count_layers(shapes: dict[str, tuple[int, ...]], source: str) -> int:
    indices = {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}
    if not indices:
        raise CheckpointError(f"{source} has no transformer_blocks.* tensors; it is not a DiT checkpoint.")
    return max(indices) + 1


def require_keys(shapes: dict[str, tuple[int, ...]], keys: list[str], source: str, what: str) -> None:
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise CheckpointError(f"{source} is not a {what} checkpoint: it lacks {', '.join(missing)}. "
                              f"Choose the transformer/ component (or its single .safetensors file).")


def trunk_fields_from_shapes(shapes: dict[str, tuple[int, ...]], source: str, *, defaults: DiTConfig, what: str,
                             required: list[str], patch_key: str, text_key: str, num_conditions: int) -> dict:
    """The trunk's config fields from tensor shapes, after checking the ``required`` keys of a ``what``
    checkpoint; the head split (not visible in shapes) keeps the default head_dim."""
    require_keys(shapes, [patch_key, text_key, *required], source, what)
    dim, patch_in = shapes[patch_key]
    patch_size = int(round(math.sqrt(patch_in / defaults.in_channels)))
    head_dim = defaults.attention_head_dim
    if dim % head_dim:
        raise ConfigNotInferable(f"{source}: inner dim {dim} is not a multiple of head_dim {head_dim}; put the "
                                 f"transformer's config.json beside the weights.")
    return dict(
        patch_size=patch_size, out_channels=shapes["proj_out.weight"][0] // patch_size ** 2,
        text_embed_dim=shapes[text_key][1],
        time_embed_dim=shapes["time_condition_embed.timestep_embedder.linear_1.weight"][0],
        condition_dim=shapes["time_condition_embed.condition_embedder.linear_1.weight"][1] // (2 * num_conditions),
        num_layers=count_layers(shapes, source), num_attention_heads=dim // head_dim)


def tensor_role(key: str, shape: tuple[int, ...]) -> str:
    """Attention and feed-forward weights of the blocks are quantized; their adaLN (``norm1``) and the final
    ``norm_out`` are modulation; the input embeddings and the output projection keep the source precision."""
    if len(shape) < 2:
        return components.KEEP
    if key.endswith("norm1.linear.weight") or key.startswith("norm_out."):
        return components.MODULATION
    if key.startswith("transformer_blocks."):
        return components.LINEAR
    if key.endswith("token_embedding.weight"):
        return components.EMBEDDING
    return components.KEEP


def dit_spec(name: str, architecture: str, config_type: type, build: type,
             config_from_shapes: Callable[[dict, str], DiTConfig]) -> components.ComponentSpec:
    """What the GLM-Image and CogView4 DiTs share in their ComponentSpec."""
    return components.ComponentSpec(
        name=name, architecture=architecture, subfolder="transformer", config_type=config_type, build=build,
        config_from_dict=config_type.from_dict, config_from_shapes=config_from_shapes, fp16_reason=FP16_REASON,
        quantize=tensor_role, blocks="transformer_blocks")
