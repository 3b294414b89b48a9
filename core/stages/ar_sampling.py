"""AR sampling: prompt -> semantic-VQ token grid, with a static KV cache and one token per decode step.

Sampling follows transformers' order (temperature, top-k, top-p with the boundary token kept) on device with a
``torch.Generator`` seeded from ``seed``. Unlike the reference, ids >= 16384 (end-of-image and the reserved
ids) are masked at every step, so the result always has exactly the grid's number of codebook ids.

Batches: several prompts (left-padded, attention mask, per-sample positions) and/or ``num_images`` samples
per prompt run in one decode loop; every sample shares the same ``source_grids``.
"""
from __future__ import annotations

import torch

from ..models.glm_ar import GlmImageAR, KVCache
from ..runtime.comfy_compat import Progress
from ..runtime.handles import TokenGrid
from .ar_prompt import CODEBOOK_SIZE, TextTokenizer, build_ar_inputs


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper on [B, V] logits."""
    scores = logits / temperature if temperature != 1.0 else logits
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def sample_codebook_ids(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                        generator: torch.Generator) -> torch.Tensor:
    """One codebook id in [0, 16384) per row of ``logits`` [B, V]; no host synchronisation."""
    # dropping ids >= 16384 equals masking them to -inf before the warpers (they would get probability 0)
    probs = filter_logits(logits[:, :CODEBOOK_SIZE], temperature, top_k, top_p).softmax(dim=-1)
    # argmax(p / Exp(1)) draws from p (like multinomial) with a fixed number of random draws per step
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def decode_step(model: GlmImageAR, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                index: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int,
                top_p: float) -> torch.Tensor:
    """Feed ``tokens`` [B,1] at cache slot ``index`` (0-dim device tensor) and sample the next ids [B].

    Static shapes and no host sync, so it can be captured in a CUDA graph with ``tokens``, ``positions``
    [3,B,1] and ``index`` as static inputs.
    """
    logits = model(tokens, positions, cache, index)[:, -1]
    return sample_codebook_ids(logits, temperature, top_k, top_p, generator)


def _check_sampling(temperature: float, top_k: int, top_p: float, num_images: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); greedy decoding is not supported.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p}).")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k}); 16512 disables it.")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1 (got {num_images}).")


@torch.inference_mode()
def generate_token_grid(model: GlmImageAR, tokenizer: TextTokenizer, prompt: str | list[str], height: int,
                        width: int, *, seed: int, temperature: float = 0.9, top_p: float = 0.75,
                        top_k: int = 16512, num_images: int = 1, source_grids: list[torch.Tensor] | None = None,
                        progress: bool = True, preview=None) -> TokenGrid:
    """Sample the token grid(s) for ``prompt`` at ``height`` x ``width`` (floored to multiples of 32).

    Returns a TokenGrid with ids [B, H/32, W/32] (B = prompts x num_images, prompt-major), the preview grids
    for text-to-image, on the CPU. ``source_grids``: [h, w] id grids of reference images (editing).
    ``preview(ids_written [B, n], grids)``: a live preview for the progress bar, or None (``token_preview``).
    """
    _check_sampling(temperature, top_k, top_p, num_images)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("No prompt given.")
    prompts = [p for p in prompts for _ in range(num_images)]
    inputs = build_ar_inputs(tokenizer, prompts, height, width, source_grids)

    device = model.device
    batch, length = inputs.input_ids.shape
    total = inputs.num_new_tokens
    context = model.config.max_position_embeddings
    if length + total > context:
        raise ValueError(f"The prompt is {length} tokens and the grid needs {total} more, over the model's context of "
                         f"{context} tokens: shorten the prompt (or use fewer or smaller reference images).")
    input_ids, positions = inputs.input_ids.to(device), inputs.position_ids.to(device)
    decode_positions = inputs.decode_position_ids.to(device)
    cache = model.new_cache(batch, length + total - 1, inputs.attention_mask)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    out = torch.empty(batch, total, dtype=torch.long, device=device)
    index = torch.tensor(length, device=device)

    with Progress(total, "GLM-Image AR tokens", enabled=progress) as bar:
        logits = model(input_ids, positions, cache, 0, last_only=True)[:, -1]
        tokens = sample_codebook_ids(logits, temperature, top_k, top_p, generator)
        out[:, 0] = tokens
        bar.update(preview=preview(out[:, :1], inputs.grids) if preview is not None else None)
        for k in range(1, total):
            tokens = decode_step(model, cache, tokens[:, None], decode_positions[:, :, k - 1:k], index,
                                 generator, temperature, top_k, top_p)
            out[:, k] = tokens
            index += 1
            bar.update(preview=preview(out[:, :k + 1], inputs.grids) if preview is not None else None)

    out = out.cpu()
    t = inputs.target
    preview = None
    if len(inputs.grids) == 2:  # text-to-image: the preview comes first
        preview = out[:, :t.ph * t.pw].view(batch, t.ph, t.pw)
        out = out[:, t.ph * t.pw:]
    return TokenGrid(ids=out.view(batch, t.th, t.tw), height=t.height, width=t.width, preview=preview)
