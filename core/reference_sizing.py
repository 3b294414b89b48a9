"""Reference-image sizes and pixel formats for GLM-Image editing.

A reference goes down two paths that resize it separately: the AR tokenizer (the processor's
``smart_resize``: scale into the side limits, halve, round to 16) and the VAE (floor to 16). The
prior ids of the reference are the AR grid upsampled 2x and are *added* to the DiT patch grid, so the
two grids must agree: ``2 * smart_resize(H, W) / 16 == (H // 16, W // 16)``. That holds exactly when
H and W are multiples of 32, the aspect ratio is at most 4 and both sides lie inside the processor's
limits (short side >= sqrt(min_pixels), long side <= sqrt(max_pixels)); ``normalize_reference_size``
picks such a size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

PATCH_SIZE = 16                  # processor patch_size * merge_size
MIN_PIXELS = 512 * 512           # processor/preprocessor_config.json
MAX_PIXELS = 2048 * 2048
MAX_ASPECT = 4
TOKEN_PIXELS = 32                # one AR token covers 32x32 pixels of the reference (d32)


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size the GLM-Image image processor resizes an image to (transformers ``smart_resize``).

    The result is about half of the input (the tokenizer sees references at half size), so the token
    grid ``(h // 16, w // 16)`` is 1/32 of the input.
    """
    if height < factor or width < factor:
        raise ValueError(f"height:{height} or width:{width} must be larger than factor:{factor}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be smaller than 4, got {max(height, width) / min(height, width)}")
    shortest_edge = int(round(math.sqrt(min_pixels)))
    longest_edge = int(round(math.sqrt(max_pixels)))
    scale = 1.0
    if min(height, width) < shortest_edge:
        scale = shortest_edge / min(height, width)
    if max(height, width) * scale > longest_edge:
        scale = longest_edge / max(height, width)
    height, width = height // 2, width // 2
    h_bar = max(factor, int(round(height * scale / factor)) * factor)
    w_bar = max(factor, int(round(width * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest_edge:
        beta = max(h_bar, w_bar) / longest_edge
        h_bar = max(factor, int(math.floor((h_bar / beta) / factor)) * factor)
        w_bar = max(factor, int(math.floor((w_bar / beta) / factor)) * factor)
    return h_bar, w_bar


def normalize_reference_size(height: int, width: int, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                             max_aspect: float = MAX_ASPECT) -> tuple[int, int, str]:
    """The size (multiples of 32, aspect <= ``max_aspect``, inside the pixel limits) to resize a reference
    of ``height`` x ``width`` to, so its AR token grid x2 equals its decoder patch grid.

    Returns ``(new_height, new_width, note)``; ``note`` is "" when the size is used as is, else a sentence
    saying which size is used and why. Raises ``ValueError`` for a reference that is too small or too
    elongated (naming the crop or pad that would fix it).
    """
    if height < TOKEN_PIXELS or width < TOKEN_PIXELS:
        raise ValueError(f"Reference image {height}x{width} (HxW) is too small: the semantic tokenizer needs at least "
                         f"{TOKEN_PIXELS} px per side (one token covers 32x32 px; the processor rejects sides under "
                         f"{PATCH_SIZE} px). Use a larger reference or upscale it first.")
    aspect = max(height, width) / min(height, width)
    if aspect > max_aspect:
        if height > width:
            crop = (int(width * max_aspect), width)
            pad = (height, math.ceil(height / max_aspect))
        else:
            crop = (height, int(height * max_aspect))
            pad = (math.ceil(width / max_aspect), width)
        raise ValueError(f"Reference image {height}x{width} (HxW) has aspect ratio {aspect:.2f}, above the {max_aspect:g} "
                         f"GLM-Image accepts: crop to {crop[0]}x{crop[1]} or pad to {pad[0]}x{pad[1]} (HxW) first.")
    lo = TOKEN_PIXELS * math.ceil(round(math.sqrt(min_pixels)) / TOKEN_PIXELS)
    hi = TOKEN_PIXELS * (round(math.sqrt(max_pixels)) // TOKEN_PIXELS)
    if lo > hi:
        raise ValueError(f"min_pixels={min_pixels} and max_pixels={max_pixels} leave no side length that is a "
                         f"multiple of {TOKEN_PIXELS} between them.")
    scale = 1.0
    if min(height, width) < lo:
        scale = lo / min(height, width)
    if max(height, width) * scale > hi:
        scale = hi / max(height, width)

    def side(n: float) -> int:
        return min(hi, max(lo, TOKEN_PIXELS * round(n * scale / TOKEN_PIXELS)))

    new_h, new_w = side(height), side(width)
    short, long_ = min(new_h, new_w), max(new_h, new_w)
    if long_ > max_aspect * short:  # rounding must not push the ratio over the limit
        long_ = TOKEN_PIXELS * int(max_aspect * short // TOKEN_PIXELS)
        new_h, new_w = (long_, short) if new_h > new_w else (short, long_)
    if (new_h, new_w) == (height, width):
        return new_h, new_w, ""
    why = []
    if scale != 1.0:
        why.append(f"sides must lie in {lo}..{hi} px")
    if height % TOKEN_PIXELS or width % TOKEN_PIXELS:
        why.append(f"sides must be multiples of {TOKEN_PIXELS}")
    note = (f"reference resized from {height}x{width} to {new_h}x{new_w} (HxW): {' and '.join(why)} "
            f"so its token grid matches the decoder grid")
    return new_h, new_w, note


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
        raise ValueError(f"Expected one channels-last image [H, W, C] with 1 to 4 channels, got shape {tuple(image.shape)}.")
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
