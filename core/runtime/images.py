"""Pixel formats in and out: any image a user may hand in -> float32 RGB 0..1, and the reference resize."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb01(image) -> torch.Tensor:
    """One image as float32 RGB ``[H, W, 3]`` in 0..1, from a tensor, NumPy array or PIL image.

    Accepts channels-last ``[H, W]``, ``[H, W, C]`` (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; alpha is
    dropped) or ``[1, H, W, C]``; uint8 is divided by 255, 16-bit integers by 65535 (other integer types
    by 255 or 65535, whichever range holds their values); floats are clamped to 0..1.
    """
    if isinstance(image, Image.Image):
        image = np.array(image if image.mode in ("L", "I;16", "I", "F") else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:  # not every torch build handles uint16 tensors
            image = image.astype(np.float32) / 65535
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected an image tensor, NumPy array or PIL image, got {type(image).__name__}.")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(f"Expected one channels-last image [H, W, C] with 1 to 4 channels, got shape "
                         f"{tuple(image.shape)}.")
    if image.numel() == 0:
        raise ValueError(f"The image is empty (shape {tuple(image.shape)}): give an image with pixels.")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif image.dtype == torch.uint16:
        image = image.to(torch.int32).float() / 65535
    elif image.dtype == torch.int16:  # 16-bit data stored signed: reinterpret the bits as unsigned
        image = (image.to(torch.int32) & 0xFFFF).float() / 65535
    elif not image.is_floating_point():
        top = int(image.max())
        if image.min() < 0 or top > 65535:
            raise ValueError(f"Integer image with values in {int(image.min())}..{top}: expected 0..255 or 0..65535.")
        image = image.float() / (255 if top <= 255 else 65535)
    else:
        if not bool(torch.isfinite(image).all()):
            raise ValueError("The image holds NaN or inf pixels: the node that made it failed numerically (often a "
                             "model run in fp16). Fix that node first.")
        top = float(image.max())
        if top > 2:
            raise ValueError(f"Float image with values up to {top:g}: expected 0..1 (divide 8-bit values by 255).")
        image = image.float().clamp(0, 1)
    channels = image.shape[-1]
    if channels in (2, 4):
        image = image[..., :-1]
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:2], 3)
    return image.contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """RGB 0..1 ``[H, W, 3]`` to an 8-bit array, the form the reference processors resize."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def resize_reference(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize RGB 0..1 ``[H, W, 3]`` to ``height`` x ``width`` as diffusers resizes references (PIL Lanczos on
    8-bit pixels); returns float32 ``[height, width, 3]``. A no-op (apart from 8-bit rounding) at the same size."""
    pil = Image.fromarray(to_uint8(image))
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(pil).copy()).float() / 255
