"""Reference images for editing: sizes normalized up front, then VAE latents and semantic tokens per image."""
from __future__ import annotations

import torch

from ..models.semantic_tokenizer import SemanticTokenizer, tokenize_image
from ..models.vae import GlmVAE
from ..runtime.geometry import normalize_reference_size
from ..runtime.images import resize_reference, to_rgb01
from .handles import ReferenceImages, upsample_ids


def reference_sizes(images: list) -> tuple[list, list[tuple[int, int, str]]]:
    """The images as RGB 0..1 and the size each is resized to; raises for an unusable one before any work."""
    if not images:
        raise ValueError("No reference image given: connect an image to the image input.")
    rgb = [to_rgb01(image) for image in images]
    return rgb, [normalize_reference_size(image.shape[0], image.shape[1]) for image in rgb]


def prepare_references(images: list, vae: GlmVAE, tokenizer: SemanticTokenizer, *,
                       device: torch.device | None = None) -> tuple[ReferenceImages, str]:
    """Each image (``[H, W, C]`` tensor, array or PIL image; gray, RGBA and 16-bit are converted) becomes one
    reference, computed on ``device`` (None: where the weights are). Returns the references and a report of the
    size used for each."""
    rgb, sizes = reference_sizes(images)
    latents, prior_ids, token_ids, lines = [], [], [], []
    for i, (image, (height, width, note)) in enumerate(zip(rgb, sizes)):
        image = resize_reference(image, height, width)
        latents.append(vae.encode(image[None], device=device).float().cpu())
        ids = tokenize_image(tokenizer, image, device=device)
        token_ids.append(ids)
        prior_ids.append(upsample_ids(ids))
        lines.append(f"reference {i + 1}: {height}x{width} (HxW)" + (f"; {note}" if note else ""))
    return ReferenceImages(latents=latents, prior_ids=prior_ids, token_ids=token_ids,
                           sizes=[(h, w) for h, w, _ in sizes]), "\n".join(lines)
