"""Every size rule of the pack: GLM-Image outputs, token grids, reference images, decoder latents, CogView4.

GLM-Image output sizes: sides of 512..2048 px in multiples of 32; the AR writes a token grid of 1/32 of the
size (plus a ~16x16 preview grid in text-to-image) and the decoder works on 1/8 latents in 2x2 patches (1/16).

Reference images go down two paths that resize them separately: the AR tokenizer (the processor's
``smart_resize``: scale into the side limits, halve, round to 16) and the VAE (floor to 16). The
prior ids of the reference are the AR grid upsampled 2x and are *added* to the DiT patch grid, so the
two grids must agree: ``2 * smart_resize(H, W) / 16 == (H // 16, W // 16)``. That holds exactly when
H and W are multiples of 32, the aspect ratio is at most 4 and both sides lie inside the processor's
limits (short side >= sqrt(min_pixels), long side <= sqrt(max_pixels)); ``normalize_reference_size``
picks such a size.

CogView4-6B: sides of 512..2048 px in multiples of 32, at most 2^21 pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import check_int

PATCH_SIZE = 16                  # processor patch_size * merge_size
MIN_PIXELS = 512 * 512           # processor/preprocessor_config.json
MAX_PIXELS = 2048 * 2048
MAX_ASPECT = 4
TOKEN_PIXELS = 32                # one AR token covers 32x32 pixels of the reference (d32)
MIN_SIDE = 512                   # GLM-Image and CogView4 output sides (their READMEs)
MAX_SIDE = 2048                  # GLM-Image and CogView4 decode at most 2048 px per side
SIDE_MULTIPLE = 32               # output sides: one AR token per 32x32 px
GRID_FACTOR = TOKEN_PIXELS
LATENT_MULTIPLE = 16             # the decoder's latent: VAE 8x, then 2x2 patches
COGVIEW4_MAX_PIXELS = 2 ** 21


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
        raise ValueError(f"Reference image {height}x{width} (HxW) has aspect ratio {aspect:.2f}, above the "
                         f"{max_aspect:g} GLM-Image accepts: crop to {crop[0]}x{crop[1]} or pad to {pad[0]}x{pad[1]} "
                         f"(HxW) first.")
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


# ---- GLM-Image outputs and token grids ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetGrid:
    height: int   # pixels, floored to a multiple of 32
    width: int
    th: int       # token grid (1/32)
    tw: int
    ph: int       # preview grid (text-to-image)
    pw: int


def check_glm_image_size(height: int, width: int) -> None:
    """GLM-Image's documented output sizes: sides in 512..2048 px, multiples of 32 (the reference floors other
    sizes silently; the pack asks for a valid one instead)."""
    def nearest(side: int) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE))

    height, width = check_int(height, "height"), check_int(width, "width")  # any value in: a clear message out
    if (height % SIDE_MULTIPLE or width % SIDE_MULTIPLE
            or not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE)):
        raise ValueError(f"GLM-Image makes images with sides of {MIN_SIDE}..{MAX_SIDE} px in multiples of "
                         f"{SIDE_MULTIPLE}; {width}x{height} (WxH) is not one. The nearest valid size is "
                         f"{nearest(width)}x{nearest(height)}.")


def target_grid(height: int, width: int) -> TargetGrid:
    """The processor's ``_get_target_shape``: sizes floored to multiples of 32, preview of ~256 tokens."""
    h, w = (int(height) // GRID_FACTOR) * GRID_FACTOR, (int(width) // GRID_FACTOR) * GRID_FACTOR
    if h < GRID_FACTOR or w < GRID_FACTOR:
        raise ValueError(f"Size {width}x{height} gives no token grid: width and height must be at least "
                         f"{GRID_FACTOR} (they are floored to multiples of {GRID_FACTOR}).")
    th, tw = h // GRID_FACTOR, w // GRID_FACTOR
    ratio = th / tw
    ph, pw = int(math.sqrt(ratio) * (GRID_FACTOR // 2)), int(math.sqrt(1 / ratio) * (GRID_FACTOR // 2))
    return TargetGrid(h, w, th, tw, ph, pw)


def check_token_grid_size(height: int, width: int, max_pixels: int = MAX_PIXELS) -> None:
    """Token grids exist for output sizes with sides that are multiples of 32, at most sqrt(max_pixels)
    (2048 px) and an aspect ratio of at most 4."""
    height, width = check_int(height, "height"), check_int(width, "width")  # any value in: a clear message out
    longest = int(round(check_int(max_pixels, "max_pixels", 1) ** 0.5))
    problems = []
    if height % TOKEN_PIXELS or width % TOKEN_PIXELS or min(height, width) < TOKEN_PIXELS:
        problems.append(f"sides must be multiples of {TOKEN_PIXELS}")
    if max(height, width) > longest:
        problems.append(f"sides must be at most {longest} px")
    if min(height, width) > 0 and max(height, width) / min(height, width) > MAX_ASPECT:
        problems.append(f"the aspect ratio must be at most {MAX_ASPECT}")
    if problems:
        raise ValueError(f"No token grid for an output of {width}x{height} (WxH): {'; '.join(problems)}. "
                         f"Choose a size such as 1024x1024, 1152x896 or 2048x1024.")


def check_token_grid_shape(shape: tuple[int, ...], height: int, width: int) -> None:
    """Token ids of an output of ``height`` x ``width`` must be ``[B, H/32, W/32]``: a grid of the right count
    but another shape would be upsampled row-major into the wrong places without any error downstream."""
    want = (height // TOKEN_PIXELS, width // TOKEN_PIXELS)
    if len(shape) == 3 and shape[0] == 0:
        raise ValueError(f"The token grid holds no images (ids of shape {tuple(shape)}): the node that made it "
                         f"got an empty batch; give it at least one image.")
    if len(shape) != 3 or tuple(shape[1:]) != want:
        raise ValueError(f"The token grid has ids of shape {tuple(shape)} but its size {height}x{width} (HxW) needs "
                         f"[B, {want[0]}, {want[1]}] (H/32, W/32). Feed the tokens of an AR sampler or Image to "
                         f"Tokens node made for this size.")


def check_latent_size(height: int, width: int, multiple: int = LATENT_MULTIPLE) -> None:
    """The decoders' pixel sizes: positive multiples of 16 (8x VAE, then 2x2 patches)."""
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}.")


def patch_count(height: int, width: int) -> int:
    """DiT patches (and 2x-upsampled prior ids) of an image: (H/16) * (W/16)."""
    return (height // LATENT_MULTIPLE) * (width // LATENT_MULTIPLE)


def check_multiple_of(height: int, width: int, multiple: int, what: str, note: str = "") -> None:
    """Image sides a ``multiple``-times downsampling network (a VAE, a VQ-VAE) can encode, with the crop or
    resize that fixes them."""
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        f = multiple
        raise ValueError(f"{what} needs height and width that are multiples of {f}; got {width}x{height} (WxH). "
                         f"Crop or resize to {max(f, width // f * f)}x{max(f, height // f * f)} or "
                         f"{-(-width // f) * f}x{-(-height // f) * f}{note}.")


# ---- CogView4 ----------------------------------------------------------------------------------------------------

def check_cogview4_size(height: int, width: int) -> None:
    """CogView4-6B's limits (its README): sides 512..2048, multiples of 32, at most 2^21 pixels."""
    height, width = check_int(height, "height"), check_int(width, "width")
    problems = []
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        problems.append(f"each side must be {MIN_SIDE}..{MAX_SIDE} px")
    if height % SIDE_MULTIPLE or width % SIDE_MULTIPLE:
        problems.append(f"both sides must be multiples of {SIDE_MULTIPLE}")
    if height * width > COGVIEW4_MAX_PIXELS:
        problems.append(f"at most 2^21 = {COGVIEW4_MAX_PIXELS} pixels ({height * width} given)")
    if problems:
        raise ValueError(f"CogView4 cannot make {width}x{height} (WxH): {'; '.join(problems)}. "
                         f"Valid sizes include 1024x1024, 1280x768, 768x1280, 1536x1024, 2048x1024 and 1440x1440.")


# ---- upscaling and refining --------------------------------------------------------------------------------------

MIN_UPSCALE_INPUT_SIDE = TOKEN_PIXELS   # the reference path needs one 32 px token per side
LARGE_ALTERNATIVE = ("upscale crops of at most 1024 px and stitch them, or use a model upscaler "
                     "(core ImageUpscaleWithModel)")


def upscale_2x_size(height: int, width: int) -> tuple[int, int]:
    """The output size of a 2x GLM-Image upscale: the input rounded to multiples of 16, doubled. Raises
    ``ValueError`` for inputs the tokenizer and reference path cannot take or outputs above 2048 px per side."""
    if min(height, width) < MIN_UPSCALE_INPUT_SIDE:
        raise ValueError(f"Image {height}x{width} (HxW) is too small to upscale with GLM-Image: the semantic "
                         f"tokenizer and the reference path need at least {MIN_UPSCALE_INPUT_SIDE} px per side.")
    out_h, out_w = (2 * LATENT_MULTIPLE * max(1, round(n / LATENT_MULTIPLE)) for n in (height, width))
    if max(height / width, width / height, out_h / out_w, out_w / out_h) > MAX_ASPECT:
        raise ValueError(f"Image {height}x{width} (HxW) gives {out_h}x{out_w} at 2x: an aspect ratio above "
                         f"{MAX_ASPECT}, which GLM-Image's tokenizer rejects; crop it first.")
    if max(out_h, out_w) > MAX_SIDE:
        raise ValueError(f"Upscaling {height}x{width} (HxW) 2x gives {out_h}x{out_w}, above the {MAX_SIDE} px per "
                         f"side the decoder handles: {LARGE_ALTERNATIVE}.")
    return out_h, out_w


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``scale`` times the size, rounded to multiples of 32."""
    return tuple(SIDE_MULTIPLE * max(1, round(n * scale / SIDE_MULTIPLE)) for n in (height, width))


# ---- previews ----------------------------------------------------------------------------------------------------

PREVIEW_FIT_LATENT_SIDE = 32     # latents decoded to fit the preview colours: 256x256 px each
PREVIEW_FIT_COARSE = 4           # their structure: noise at 1/4 of that side, upsampled (regions, not pixels)


def preview_cell(rows: int, cols: int, longest: int) -> int:
    """Pixels per token when a ``rows`` x ``cols`` token grid is drawn as a preview of at most ``longest`` px a
    side (whole pixels, so the cells stay crisp when the frontend shows it)."""
    return max(1, longest // max(rows, cols, 1))
