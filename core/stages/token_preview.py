"""Token grids as pictures: the AR stage's live preview while it writes, and the Token Grid Preview node.

A semantic-VQ id has no colour of its own (the tokenizer has no pixel decoder), so an id is coloured by where
its vector lies: the first three principal components of the 16384 code vectors (the AR model's input
embeddings of the codebook ids, or the tokenizer's codebook), each stretched over its 1st..99th percentile to
0..255. Codes the model treats alike get like colours, so regions of like content show as patches of like
colour. Without a model, every id gets a fixed pseudo-random colour (equal ids, equal colours).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..host import progress
from ..runtime import devices
from ..runtime.geometry import preview_cell
from .ar_prompt import ARVocabulary
from .handles import TokenGrid

CODEBOOK_SIZE = ARVocabulary.codebook_size  # the release's; a loaded AR model's comes from its config

UNWRITTEN = (40, 40, 40)    # cells the AR has not written yet
PALETTE_SEED = 0


def pca_palette(vectors: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` code vectors -> ``[N, 3]`` uint8 colours from their first three principal components."""
    x = vectors.detach().float()
    x = x - x.mean(dim=0, keepdim=True)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(PALETTE_SEED)  # pca_lowrank projects randomly; keep the colours the same every run
        _, _, components = torch.pca_lowrank(x, q=min(3, *x.shape), center=False, niter=4)
    # a component's sign is arbitrary: orient each so that its largest loading is positive
    largest = components.abs().argmax(dim=0)
    components = components * components[largest, torch.arange(components.shape[1])].sign()
    projected = x @ components
    if projected.shape[1] < 3:
        projected = F.pad(projected, (0, 3 - projected.shape[1]))
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    return (scaled.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def id_palette(size: int = CODEBOOK_SIZE) -> torch.Tensor:
    """``[size, 3]`` uint8: a fixed pseudo-random colour per id, for grids without a model to colour them."""
    generator = torch.Generator().manual_seed(PALETTE_SEED)
    return torch.randint(0, 256, (size, 3), generator=generator, dtype=torch.uint8)


_palettes: "weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def code_vectors(ar_model=None, tokenizer=None, codebook_size: int = CODEBOOK_SIZE
                 ) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(owner module, ``[codebook_size, D]`` vectors) of the AR model's codebook-id embeddings or the tokenizer's
    codebook, or None without either."""
    if ar_model is not None:  # looked up, not sliced: FP8 / GGUF tables dequantize the rows asked for
        embed = ar_model.embed_tokens
        with torch.no_grad():
            return embed, embed(torch.arange(codebook_size, device=embed.weight.device))
    if tokenizer is not None:
        codebook = tokenizer.model["vqmodel"].quantize.embedding
        return codebook, codebook.weight
    return None


def palette(ar_model=None, tokenizer=None, codebook_size: int = CODEBOOK_SIZE) -> torch.Tensor:
    """The colours of ``ar_model``'s or ``tokenizer``'s codes (computed once per loaded model), else by id."""
    source = code_vectors(ar_model, tokenizer, codebook_size)
    if source is None:
        return id_palette()
    owner, vectors = source
    if owner not in _palettes:  # on the compute device: the AR's table is 16384 x 4096
        _palettes[owner] = pca_palette(vectors.detach().to(devices.get_device()))
    return _palettes[owner]


def colour_grid(ids: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Ids ``[h, w]`` (-1: not written yet) -> uint8 RGB ``[h, w, 3]``."""
    ids = ids.long().cpu()
    if ids.numel() and int(ids.max()) >= len(colours):
        raise ValueError(f"token id {int(ids.max())} is outside the {len(colours)} ids the palette colours.")
    rgb = colours[ids.clamp_min(0)]
    rgb[ids < 0] = torch.tensor(UNWRITTEN, dtype=torch.uint8)
    return rgb


def grid_image(ids: torch.Tensor, colours: torch.Tensor, cell: int) -> Image.Image:
    """Ids ``[h, w]`` as a PIL image of ``cell`` x ``cell`` pixels per token."""
    rgb = colour_grid(ids, colours).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return Image.fromarray(np.ascontiguousarray(rgb.numpy()))


def token_grid_images(tokens: TokenGrid, colours: torch.Tensor, grid: str = "tokens") -> torch.Tensor:
    """The ``grid`` ("tokens" or "preview") of every sample as an ``IMAGE`` ``[B, H, W, 3]`` (float 0..1) at the
    token grid's output size, each token a block of pixels over the part of the image it stands for."""
    if grid not in ("tokens", "preview"):
        raise ValueError(f"grid must be 'tokens' or 'preview', got {grid!r}.")
    ids = tokens.ids if grid == "tokens" else tokens.preview
    if ids is None:
        raise ValueError("This token grid has no preview grid (only text-to-image AR output has one): show "
                         "grid 'tokens' instead.")
    rgb = torch.stack([colour_grid(sample, colours) for sample in ids]).permute(0, 3, 1, 2).float() / 255
    rgb = F.interpolate(rgb, size=(tokens.height, tokens.width), mode="nearest")
    return rgb.permute(0, 2, 3, 1).contiguous()


class ARPreview:
    """The AR's live preview: the grid being written (first sample), redrawn once per finished row.

    Called by ``generate_token_grid`` after each token with the ids written so far ``[B, n]`` (on the device)
    and the generated grids in order; returns a PIL image when a row is complete, else None. The colours come
    from the AR model's code embeddings, computed at the first call (when the weights are on the GPU).
    """

    def __init__(self, ar_model, codebook_size: int = CODEBOOK_SIZE):
        self.ar_model = ar_model
        self.codebook_size = codebook_size
        self.colours: torch.Tensor | None = None

    def __call__(self, written: torch.Tensor, grids: list[tuple[int, int]]) -> Image.Image | None:
        n = written.shape[1]
        start = 0
        for rows, cols in grids:
            if n <= start + rows * cols:
                break
            start += rows * cols
        done = n - start
        if done % cols:
            return None
        if self.colours is None:
            self.colours = palette(ar_model=self.ar_model, codebook_size=self.codebook_size)
        ids = torch.full((rows * cols,), -1, dtype=torch.long)
        ids[:done] = written[0, start:n].cpu()
        return grid_image(ids.view(rows, cols), self.colours, preview_cell(rows, cols, progress.preview_size()))


def ar_preview(ar_model, codebook_size: int = CODEBOOK_SIZE) -> ARPreview | None:
    """The AR sampler's live preview, or None when ComfyUI's ``--preview-method`` is ``none``."""
    return ARPreview(ar_model, codebook_size) if progress.preview_method() != "none" else None
