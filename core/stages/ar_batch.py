"""AR token sampling for a batch of independent requests (the AR service): one decode loop, own settings per row.

A request is what ``/generate`` carries: prompt ids (source grids already expanded), the processor's grids,
and its own seed, temperature, top-p and top-k. Requests batch together when they write the same grids
(``written_grids``). Each row gets the tokens ``ar_sampling.generate_token_grid`` gives for the same prompt
and seed alone: its prompt is prefilled alone (batch 1, as the local sampler does), its sampling noise comes
from its own generator (``SamplingNoise`` per row, the local sampler's draws), its settings filter its own
logits (``sample_codebook_ids`` per row). Only the decode steps are batched: rows are left-aligned in one KV
cache (their prefilled keys copied to the end of the prompt slots, the empty slots masked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.glm_ar import GlmImageAR, mrope_cos_sin
from ..runtime import checks
from .ar_prompt import rope_index
from .ar_sampling import SamplingNoise, sample_codebook_ids
from .settings import ARSampling


def filters(sampling: ARSampling) -> tuple[float, int, float]:
    """The settings that filter the logits: rows that share them share one ``sample_codebook_ids`` call."""
    return sampling.temperature, sampling.top_k, sampling.top_p


@dataclass(frozen=True)
class TokenRequest:
    """One image's AR request. ``grids``: (h, w) per source image, then the target, then (text-to-image)
    the preview: the processor's ``image_grid_thw`` order."""
    input_ids: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    sampling: ARSampling

    def __post_init__(self):
        if not self.input_ids:
            raise ValueError("input_ids is empty: send the prompt's token ids.")
        if not self.grids or any(len(g) != 2 or min(g) < 1 for g in self.grids):
            raise ValueError(f"image_grid_thw must list [1, h, w] grids with h, w >= 1 (got {list(self.grids)}).")


@dataclass(frozen=True)
class PromptIds:
    """The special ids the request checks need (``ar_prompt.ARVocabulary`` of the served release)."""
    image_start_id: int
    image_end_id: int
    codebook_size: int
    vocab_size: int


def source_count(request: TokenRequest, ids: PromptIds) -> int:
    return sum(1 for t in request.input_ids if t == ids.image_end_id)


def written_grids(request: TokenRequest, ids: PromptIds) -> tuple[tuple[int, int], ...]:
    """The grids the model writes, in writing order (preview first in text-to-image): the batching key."""
    return tuple(reversed(request.grids[source_count(request, ids):]))


def check_request(request: TokenRequest, ids: PromptIds, max_positions: int) -> None:
    """Refuse a request the AR cannot run, with what to change."""
    sources = source_count(request, ids)
    starts = sum(1 for t in request.input_ids if t == ids.image_start_id)
    written = len(request.grids) - sources
    if written not in (1, 2) or (written == 2) != (sources == 0) or starts != sources + 1:
        raise ValueError(f"image_grid_thw has {len(request.grids)} grids for a prompt with {sources} source image(s) "
                         f"and {starts} image start marker(s): text-to-image sends [target, preview], editing one "
                         f"grid per source then the target, with the prompt built by the GLM-Image processor.")
    if request.input_ids[-1] != ids.image_start_id:
        raise ValueError(f"input_ids must end with the image start marker {ids.image_start_id} (the GLM-Image "
                         f"processor's prompt).")
    bad = [t for t in request.input_ids if not 0 <= t < ids.vocab_size]
    if bad:
        raise ValueError(f"input_ids has ids outside the model's vocabulary of {ids.vocab_size} (first: {bad[0]}).")
    total = len(request.input_ids) + sum(h * w for h, w in request.grids[sources:])
    if total > max_positions:
        raise ValueError(f"the prompt ({len(request.input_ids)} ids) and its grids need {total} positions, over the "
                         f"model's context of {max_positions}: shorten the prompt or the size.")


def _row_inputs(request: TokenRequest, ids: PromptIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([request.input_ids], dtype=torch.long)
    positions, decode = rope_index(input_ids, torch.ones_like(input_ids), list(request.grids), ids.image_start_id,
                                   ids.image_end_id)
    return input_ids, positions, decode


@torch.inference_mode()
def generate_batch(model: GlmImageAR, requests: list[TokenRequest], ids: PromptIds,
                   on_step: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The codebook ids every request writes (preview grid first in text-to-image), one list per request.

    All requests must write the same grids. ``on_step(k, total)`` runs before every decode step (a service
    checks cancellations there; raising stops the batch).
    """
    if not requests:
        return []
    grids = {written_grids(r, ids) for r in requests}
    if len(grids) != 1:
        raise ValueError(f"requests of one batch must write the same grids, got {sorted(grids)}")
    codebook = ids.codebook_size
    device, batch = model.device, len(requests)
    rows = [_row_inputs(r, ids) for r in requests]
    length = max(r[0].shape[1] for r in rows)
    total = sum(h * w for h, w in next(iter(grids)))
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, (row_ids, _, _) in enumerate(rows):
        attention_mask[i, length - row_ids.shape[1]:] = 1
    cache = model.new_cache(batch, length + total - 1, attention_mask)
    noises, first = [], []
    for i, (request, (row_ids, positions, _)) in enumerate(zip(requests, rows)):
        n = row_ids.shape[1]
        row_cache = model.new_cache(1, n)
        logits = model(row_ids.to(device), positions.to(device), row_cache, 0, last_only=True)[:, -1]
        checks.check_finite_output(logits, "The AR model's prefill", model.dtype)
        for batched, alone in zip(cache.k + cache.v, row_cache.k + row_cache.v):
            batched[i, :, length - n:length] = alone[0]
        sampling = request.sampling
        generator = torch.Generator(device=device).manual_seed(int(sampling.seed))
        noise = SamplingNoise(generator, 1, device, sampling.greedy, codebook)
        noise.refill_for(0)
        first.append(sample_codebook_ids(logits, sampling, noise.at(0), codebook))
        noises.append(noise)
    decode = torch.cat([r[2] for r in rows], dim=1).to(device)  # [3, B, total + 1]
    cos, sin = mrope_cos_sin(model.config, decode, model.dtype)
    out = torch.empty(batch, total, dtype=torch.long, device=device)
    out[:, 0] = torch.cat(first)
    groups = _settings_groups(requests, device)
    for k in range(1, total):
        if on_step is not None:
            on_step(k, total)
        position = torch.tensor([k - 1], device=device)
        rope = cos.index_select(2, position), sin.index_select(2, position)
        logits = model(out[:, k - 1:k], None, cache, torch.tensor(length + k - 1, device=device), rope=rope)[:, -1]
        for noise in noises:
            noise.refill_for(k)
        for sampling, members, rows in groups:
            # row-wise filters: one call for the rows that share settings gives each row what it gets alone
            noise = None if sampling.greedy else torch.cat([noises[i].at(k) for i in members])
            out[rows, k] = sample_codebook_ids(logits.index_select(0, rows), sampling, noise, codebook)
    return out.cpu().tolist()


def _settings_groups(requests: list[TokenRequest], device) -> list[tuple[ARSampling, list[int], torch.Tensor]]:
    """(the settings of the first row of each group, the group's rows as a list and on ``device``: the loop
    indexes with both and never reads a device tensor back)."""
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(filters(r.sampling), []).append(i)
    return [(requests[rows[0]].sampling, rows, torch.tensor(rows, device=device)) for rows in groups.values()]
