"""AR sampling: prompt -> semantic-VQ token grid, with a static KV cache and one token per decode step.

Sampling follows transformers' order (temperature, top-k, top-p with the boundary token kept) on device with a
``torch.Generator`` seeded from ``seed``. Unlike the reference, ids >= the codebook size (16384 in the release:
end-of-image and the reserved ids) are masked at every step, so the result always has exactly the grid's
number of codebook ids.

Batches: several prompts (left-padded, attention mask, per-sample positions) and/or ``num_images`` samples
per prompt run in one decode loop; every sample shares the same ``source_grids``.
"""
from __future__ import annotations

import torch

from ..models.glm_ar import GlmImageAR, KVCache
from ..runtime import checks
from ..runtime.comfy_compat import OutOfMemory, Progress, available_memory
from ..runtime.handles import TokenGrid
from .ar_prompt import TextTokenizer, build_ar_inputs


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
                        generator: torch.Generator, codebook_size: int = 16384) -> torch.Tensor:
    """One codebook id in [0, codebook_size) per row of ``logits`` [B, V]; no host synchronisation."""
    # dropping ids >= codebook_size equals masking them to -inf before the warpers (they would get probability 0)
    probs = filter_logits(logits[:, :codebook_size], temperature, top_k, top_p).softmax(dim=-1)
    # argmax(p / Exp(1)) draws from p (like multinomial) with a fixed number of random draws per step
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def decode_step(model: GlmImageAR, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                index: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int,
                top_p: float, codebook_size: int = 16384) -> torch.Tensor:
    """Feed ``tokens`` [B,1] at cache slot ``index`` (0-dim device tensor) and sample the next ids [B].

    Static shapes and no host sync, so it can be captured in a CUDA graph with ``tokens``, ``positions``
    [3,B,1] and ``index`` as static inputs.
    """
    logits = model(tokens, positions, cache, index)[:, -1]
    return sample_codebook_ids(logits, temperature, top_k, top_p, generator, codebook_size)


def check_sampling_settings(temperature: float, top_k: int, top_p: float, num_images: int) -> None:
    """The AR sampler's settings (the node's VALIDATE_INPUTS calls this too)."""
    checks.check_float(temperature, "temperature", 0.0, low_open=True,
                       fix="Use a temperature above 0 (0.9 is the release's default); greedy decoding is not "
                           "supported.")
    checks.check_float(top_p, "top_p", 0.0, 1.0, low_open=True, fix="Use a top_p in (0, 1] (1 disables it).")
    checks.check_int(top_k, "top_k", 1, fix="Use a top_k of at least 1; 16512 (the vision vocabulary) disables it.")
    checks.check_count(num_images, "num_images")


def check_prefill_fits(model: GlmImageAR, batch: int, length: int, cache_len: int, padded: bool) -> None:
    """Refuse, before allocating, a generation whose KV cache and prefill would not fit the free memory."""
    need = model.generation_bytes(batch, length, cache_len, padded)
    free = available_memory(model.device, need)
    if free is not None and need > free:
        raise OutOfMemory(f"AR token sampling of a {length}-token prompt for {batch} image(s) needs about "
                          f"{need / 2 ** 30:.1f} GB (KV cache and prefill) but only {free / 2 ** 30:.1f} GB are "
                          f"free on {model.device}: shorten the prompt, or lower num_images or the output size.")


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
    check_sampling_settings(temperature, top_k, top_p, num_images)
    checks.check_seed(seed)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("No prompt given.")
    for p in prompts:
        checks.check_text(p, "prompt")
    codebook = tokenizer.codebook_size
    if codebook > model.config.vision_vocab_size:
        raise ValueError(f"The tokenizer's codebook of {codebook} ids exceeds the AR model's "
                         f"{model.config.vision_vocab_size}-id vision vocabulary: the tokenizer and the model are "
                         f"from different releases.")
    prompts = [p for p in prompts for _ in range(num_images)]
    inputs = build_ar_inputs(tokenizer, prompts, height, width, source_grids)

    device = model.device
    batch, length = inputs.input_ids.shape
    total = inputs.num_new_tokens
    context = model.config.max_position_embeddings
    if length + total > context:
        raise ValueError(f"The prompt is {length} tokens and the grid needs {total} more, over the model's context of "
                         f"{context} tokens: shorten the prompt (or use fewer or smaller reference images).")
    check_prefill_fits(model, batch, length, length + total - 1, not bool(inputs.attention_mask.all()))
    input_ids, positions = inputs.input_ids.to(device), inputs.position_ids.to(device)
    decode_positions = inputs.decode_position_ids.to(device)
    cache = model.new_cache(batch, length + total - 1, inputs.attention_mask)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    out = torch.empty(batch, total, dtype=torch.long, device=device)
    index = torch.tensor(length, device=device)

    with Progress(total, "GLM-Image AR tokens", enabled=progress) as bar:
        logits = model(input_ids, positions, cache, 0, last_only=True)[:, -1]
        checks.check_finite_output(logits, "The AR model's prefill", model.dtype)
        tokens = sample_codebook_ids(logits, temperature, top_k, top_p, generator, codebook)
        out[:, 0] = tokens
        bar.update(preview=preview(out[:, :1], inputs.grids) if preview is not None else None)
        for k in range(1, total):
            tokens = decode_step(model, cache, tokens[:, None], decode_positions[:, :, k - 1:k], index,
                                 generator, temperature, top_k, top_p, codebook)
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
