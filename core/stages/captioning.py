"""What drives the GLM-V captioner: captioning an image and reranking images by caption score (CapS), with
progress per token or image (which also honours the user's interrupt)."""
from __future__ import annotations

import torch

from ..host.progress import Progress
from ..models.captioner import (
    PRESETS,
    Captioner,
    caption_score,
    chat_inputs,
    check_caption_settings,
    check_rerank_prompt,
    decode_reply,
    generate_reply_ids,
)
from ..runtime import checks


def caption_image(captioner: Captioner, image: torch.Tensor, preset: str = "detailed caption",
                  max_new_tokens: int = 1024, seed: int = 0, custom_instruction: str | None = None,
                  temperature: float = 0.0, device: torch.device | None = None) -> str:
    """Caption one image [H, W, 3] (0..1). ``custom_instruction`` replaces the preset's instruction.
    ``temperature`` 0 decodes greedily (deterministic); above 0 it samples with ``seed``. ``device``: the
    compute device (None: where the weights are)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown caption preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    check_caption_settings(max_new_tokens, temperature, seed)  # before the image is prepared
    if custom_instruction is not None:
        checks.check_text(custom_instruction, "custom_instruction")
    instruction = custom_instruction.strip() if custom_instruction and custom_instruction.strip() else PRESETS[preset]
    inputs = chat_inputs(captioner, image, instruction, device)
    with Progress(max_new_tokens, desc="caption") as progress:
        reply_ids = generate_reply_ids(captioner, inputs, max_new_tokens, temperature, seed, progress.update)
    return decode_reply(captioner, reply_ids)


def caption_scores(captioner: Captioner, images: torch.Tensor, prompt: str,
                   device: torch.device | None = None) -> torch.Tensor:
    """CapS of each image [B, H, W, 3] for ``prompt``: the mean per-token log-probability, higher is better.
    Each image is scored in its own forward pass (on ``device``; None: where the weights are), so scores do not
    depend on the batch."""
    check_rerank_prompt(prompt)
    prompt_ids = captioner.tokenizer(prompt.strip(), add_special_tokens=False)["input_ids"]
    if images.ndim == 3:
        images = images[None]
    with Progress(images.shape[0], desc="caption score") as progress:
        scores = []
        for image in images:
            scores.append(caption_score(captioner, image, prompt_ids, device))
            progress.update()
    return torch.stack(scores)


def rerank(captioner: Captioner, images: torch.Tensor, prompt: str,
           device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the images by caption score, best first: (indices [B], scores [B] in the input order), scored on
    ``device`` (None: where the weights are)."""
    scores = caption_scores(captioner, images, prompt, device)
    return torch.argsort(scores, descending=True, stable=True), scores
