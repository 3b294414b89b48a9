"""AR sampling: prompt -> semantic-VQ token grid, with a static KV cache and one token per decode step.

Sampling follows transformers' order (temperature, top-k, top-p with the boundary token kept) on device with
noise from a ``torch.Generator`` seeded from ``seed``; temperature 0 is greedy. Unlike the reference, ids >= the
codebook size (16384 in the release: end-of-image and the reserved ids) are masked at every step, so the result
always has exactly the grid's number of codebook ids.

Batches: several prompts (left-padded, attention mask, per-sample positions) and/or ``num_images`` samples
per prompt run in one decode loop; every sample shares the same ``source_grids``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..host.memory import OutOfMemory, available_memory
from ..host.progress import Progress
from ..models.glm_ar import GlmImageAR, KVCache, mrope_cos_sin
from ..runtime import checks
from ..runtime.devices import compute_device
from ..runtime.options import RunOptions, resolved
from . import decode_modes
from .ar_prompt import TextTokenizer, build_ar_inputs
from .handles import TokenGrid
from .settings import ARSampling


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


NOISE_BLOCK = 64  # decode steps whose sampling noise is drawn in one call


def sample_codebook_ids(logits: torch.Tensor, settings: ARSampling, noise: torch.Tensor | None,
                        codebook_size: int = 16384) -> torch.Tensor:
    """One codebook id in [0, codebook_size) per row of ``logits`` [B, V]; no host synchronisation.

    temperature 0 is greedy: the argmax over the codebook ids (transformers' ``do_sample=False`` with the
    reserved ids suppressed). Otherwise ``noise`` [B, codebook_size] holds Exp(1) draws: argmax(p / noise)
    draws from p (like multinomial) with a fixed number of random draws per step. ``settings``: temperature,
    top_k and top_p.
    """
    # dropping ids >= codebook_size equals masking them to -inf before the warpers (they would get probability 0)
    logits = logits[:, :codebook_size]
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p).softmax(dim=-1)
    return (probs / noise).argmax(dim=-1)


class SamplingNoise:
    """The sampling noise of every token, drawn from the seeded generator ``NOISE_BLOCK`` steps at a time into
    one static buffer, outside the decode step (a ``torch.Generator`` cannot be traced by ``torch.compile``,
    and a CUDA graph reads the buffer at the step index)."""

    def __init__(self, generator: torch.Generator, batch: int, device: torch.device, greedy: bool,
                 codebook_size: int):
        self.generator = generator
        self.block = None if greedy else torch.empty(NOISE_BLOCK, batch, codebook_size, device=device)

    def refill_for(self, k: int) -> None:
        """Draw the next block when token ``k`` starts one."""
        if self.block is not None and k % NOISE_BLOCK == 0:
            self.block.exponential_(1, generator=self.generator)

    def at(self, k: torch.Tensor | int) -> torch.Tensor | None:
        if self.block is None:
            return None
        if isinstance(k, int):
            return self.block[k % NOISE_BLOCK]
        return self.block.index_select(0, (k % NOISE_BLOCK).view(1))[0]


@dataclass
class DecodeState:
    """Everything a decode step reads and advances, on the device (static addresses for a CUDA graph)."""
    tokens: torch.Tensor     # [B, 1] the last sampled ids, fed next
    index: torch.Tensor      # 0-dim: the cache slot of ``tokens``
    step: torch.Tensor       # 0-dim: k, the token this step produces
    cos: torch.Tensor        # [B, 1, rows, R] M-RoPE of the decode positions; token k comes from feeding
    sin: torch.Tensor        # token k-1 at position k-1
    out: torch.Tensor        # [B, rows] every produced id (rows: the token count, rounded up to
                             # decode_modes.BUCKET under ``compiled``; the rows past it are never read)
    noise: SamplingNoise


def decode_step(model: GlmImageAR, cache: KVCache, state: DecodeState, settings: ARSampling,
                codebook_size: int = 16384, options: RunOptions | None = None) -> None:
    """Produce token ``state.step``: feed ``state.tokens`` at cache slot ``state.index``, sample, advance the state.

    In place, static shapes, no host sync and no generator: the same function runs eagerly, under
    ``torch.compile(fullgraph=True)`` and captured in a CUDA graph (one replay per token).
    """
    k = state.step
    position = (k - 1).view(1)
    rope = state.cos.index_select(2, position), state.sin.index_select(2, position)
    logits = model(state.tokens, None, cache, state.index, rope=rope, options=options)[:, -1]
    ids = sample_codebook_ids(logits, settings, state.noise.at(k), codebook_size)
    state.out.index_copy_(1, k.view(1), ids[:, None])
    state.tokens.copy_(ids[:, None])
    state.index.add_(1)
    state.step.add_(1)


_compiled_step = None


def compiled_decode_step():
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled_step


class StepRunner:
    """Runs the decode steps as asked: eagerly, compiled, and on CUDA replayed from one captured graph.

    Graph mode runs two real steps on a side stream (the compile happens there), captures the third, then
    replays: each token is one graph launch.
    """
    WARMUP = 2

    def __init__(self, mode: str, device: torch.device, step):
        self.step = step
        self.capture = mode != "eager" and device.type == "cuda"
        self.graph = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self.step()
        elif self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
            self.graph.replay()


def check_prefill_fits(model: GlmImageAR, batch: int, length: int, cache_len: int, padded: bool, *,
                      device: torch.device) -> None:
    """Refuse, before allocating, a generation whose KV cache and prefill would not fit the free memory of
    ``device``."""
    need = model.generation_bytes(batch, length, cache_len, padded)
    free = available_memory(device, need)
    if free is not None and need > free:
        raise OutOfMemory(f"AR token sampling of a {length}-token prompt for {batch} image(s) needs about "
                          f"{need / 2 ** 30:.1f} GB (KV cache and prefill) but only {free / 2 ** 30:.1f} GB are "
                          f"free on {device}: shorten the prompt, or lower num_images or the output size.")


def generation_memory(model: GlmImageAR, tokenizer: TextTokenizer, prompt: str | list[str], height: int, width: int,
                      settings: ARSampling = ARSampling(), source_grids: list[torch.Tensor] | None = None) -> int:
    """Bytes a generation allocates beside the weights (KV cache, prefill, mask): what a caller reserves before
    the model is placed, so the capture decision (``decode_modes.steps_for``) sees the placement that leaves
    room for the cache."""
    prompts = [p for p in ([prompt] if isinstance(prompt, str) else list(prompt)) for _ in range(settings.num_images)]
    inputs = build_ar_inputs(tokenizer, prompts, height, width, source_grids)
    batch, length = inputs.input_ids.shape
    cache_len = length + inputs.num_new_tokens - 1
    if settings.decode_steps == "compiled":
        cache_len = decode_modes.bucketed(cache_len)
    return model.generation_bytes(batch, length, cache_len, not bool(inputs.attention_mask.all()))


@torch.inference_mode()
def generate_token_grid(model: GlmImageAR, tokenizer: TextTokenizer, prompt: str | list[str], height: int,
                        width: int, settings: ARSampling = ARSampling(), *,
                        source_grids: list[torch.Tensor] | None = None, progress: bool = True, preview=None,
                        options: RunOptions | None = None, device: torch.device | None = None) -> TokenGrid:
    """Sample the token grid(s) for ``prompt`` at ``height`` x ``width`` (floored to multiples of 32).

    ``settings``: seed, temperature, top_k, top_p, num_images and decode_steps (``ARSampling``, checked when
    built). Returns a TokenGrid with ids [B, H/32, W/32] (B = prompts x num_images, prompt-major), the preview grids
    for text-to-image, on the CPU. ``source_grids``: [h, w] id grids of reference images (editing).
    ``preview(ids_written [B, n], grids)``: a live preview for the progress bar, or None (``token_preview``).
    ``settings.decode_steps``: ``eager``; ``cuda graph`` (the eager step captured once, one graph replay per token, on
    CUDA); ``compiled`` (``torch.compile(fullgraph=True)``, also captured on CUDA). Tokens are the same for a
    seed whichever is chosen (up to kernel rounding on GPUs). ``options``: attention kernel and kernel mode.
    ``device``: the compute device (``host.memory.on_compute_device`` yields it; None: where the weights are).
    """
    options = resolved(options)
    decode_steps = settings.decode_steps
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
    prompts = [p for p in prompts for _ in range(settings.num_images)]
    inputs = build_ar_inputs(tokenizer, prompts, height, width, source_grids)

    device = compute_device(device, model.device)
    batch, length = inputs.input_ids.shape
    total = inputs.num_new_tokens
    context = model.config.max_position_embeddings
    if length + total > context:
        raise ValueError(f"The prompt is {length} tokens and the grid needs {total} more, over the model's context of "
                         f"{context} tokens: shorten the prompt (or use fewer or smaller reference images).")
    # compiled: bucketed lengths, so prompts of other lengths reuse the compiled step (decode_modes)
    cache_len, rows = length + total - 1, total
    if decode_steps == "compiled":
        cache_len, rows = decode_modes.bucketed(cache_len), decode_modes.bucketed(total)
    check_prefill_fits(model, batch, length, cache_len, not bool(inputs.attention_mask.all()),
                       device=device)
    input_ids, positions = inputs.input_ids.to(device), inputs.position_ids.to(device)
    decode_positions = inputs.decode_position_ids.to(device)
    cache = model.new_cache(batch, cache_len, inputs.attention_mask, device)
    decode_steps = decode_modes.steps_for(model, decode_steps, device)
    noise = SamplingNoise(torch.Generator(device=device).manual_seed(int(settings.seed)), batch, device,
                          settings.greedy, codebook)
    cos, sin = (F.pad(t, (0, 0, 0, rows - total)) for t in mrope_cos_sin(model.config, decode_positions, model.dtype))
    state = DecodeState(tokens=torch.empty(batch, 1, dtype=torch.long, device=device),
                        index=torch.tensor(length, device=device), step=torch.tensor(1, device=device), cos=cos,
                        sin=sin, out=torch.empty(batch, rows, dtype=torch.long, device=device), noise=noise)
    step = decode_modes.CompiledStep(compiled_decode_step(), decode_step) if decode_steps == "compiled" else decode_step
    run = StepRunner(decode_steps, device, partial(step, model, cache, state, settings, codebook, options))

    with Progress(total, "GLM-Image AR tokens", enabled=progress) as bar:
        logits = model(input_ids, positions, cache, 0, last_only=True, options=options)[:, -1]
        checks.check_finite_output(logits, "The AR model's prefill", model.dtype)
        noise.refill_for(0)
        state.tokens[:, 0] = sample_codebook_ids(logits, settings, noise.at(0), codebook)
        state.out[:, 0] = state.tokens[:, 0]
        bar.update(preview=preview(state.out[:, :1], inputs.grids) if preview is not None else None)
        for k in range(1, total):
            noise.refill_for(k)
            run()
            bar.update(preview=preview(state.out[:, :k + 1], inputs.grids) if preview is not None else None)

    out = state.out[:, :total].cpu()
    t = inputs.target
    preview = None
    if len(inputs.grids) == 2:  # text-to-image: the preview comes first
        preview = out[:, :t.ph * t.pw].view(batch, t.ph, t.pw)
        out = out[:, t.ph * t.pw:]
    return TokenGrid(ids=out.view(batch, t.th, t.tw), height=t.height, width=t.width, preview=preview)
