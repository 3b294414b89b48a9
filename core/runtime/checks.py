"""Checks of what a user hands in (numbers, text, tensors) and of what a stage hands out (NaN or inf).

Every check raises ``ValueError`` naming the input, the value and the fix. The core calls them (the in-process
executor and scripts have no widget limits) and the nodes' ``VALIDATE_INPUTS`` call the same functions, so
ComfyUI refuses a bad value before any model loads, with the message the core would give. Size rules live in
``geometry``.
"""
from __future__ import annotations

import math
import numbers

import torch

MAX_SEED = 2 ** 64 - 1          # the seed widgets' range: 0..2^64-1 (torch generators take 64-bit seeds)
MAX_STEPS = 200                 # sampling steps of the decoders
MAX_IMAGES = 16                 # images sampled together (AR and CogView4 num_images)
MAX_BATCH = 64                  # images in one IMAGE batch a node takes (VAE encode, references, upscale...)
MAX_PROMPT_CHARS = 32768        # any prompt or instruction text, checked before it is tokenized
MAX_NEW_TOKENS = 8192           # captioner output length


class NonFiniteOutput(ValueError):
    """A stage produced NaN or inf values: what it was, how many, and the likely cause."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value, name: str, low: int | None = None, high: int | None = None, fix: str = "") -> int:
    """A whole number in ``low..high`` (either bound may be None)."""
    if not _is_int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).{_fix(fix)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} = {value} is out of range: it must be {_range(low, high)}.{_fix(fix)}")
    return int(value)


def check_float(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                fix: str = "") -> float:
    """A finite number in ``low..high`` (``(low, high]`` with ``low_open``)."""
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}).{_fix(fix)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.{_fix(fix) or ' Set a number.'}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lo = f"above {low:g}" if low_open else (f"at least {low:g}" if low is not None else "")
        span = f"{lo} and at most {high:g}" if lo and high is not None else (lo or f"at most {high:g}")
        raise ValueError(f"{name} = {value:g} is out of range: it must be {span}.{_fix(fix)}")
    return float(value)


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def _fix(fix: str) -> str:
    return f" {fix}" if fix else ""


def check_seed(seed, name: str = "seed") -> int:
    return check_int(seed, name, 0, MAX_SEED, f"Use a seed in 0..{MAX_SEED} (2^64 - 1, the seed widget's range).")


def check_steps(steps, name: str = "steps") -> int:
    return check_int(steps, name, 1, MAX_STEPS, f"Use 1..{MAX_STEPS} steps (50 is the reference's default).")


def check_guidance(guidance, name: str = "guidance") -> float:
    return check_float(guidance, name, 0.0, fix="Use a guidance of 1.0 (CFG off) or more.")


def check_count(value, name: str, maximum: int = MAX_IMAGES) -> int:
    return check_int(value, name, 1, maximum, f"Use 1..{maximum}; run the workflow again for more.")


def check_num_images(num_images) -> int:
    return check_count(num_images, "num_images")


# ---- text -----------------------------------------------------------------------------------------------------

def check_text(text, name: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A string of at most ``max_chars`` characters that can be encoded as UTF-8 (no unpaired surrogates,
    which JSON escapes such as ``\\ud800`` can produce)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__}. Connect a STRING or type the text.")
    if len(text) > max_chars:
        raise ValueError(f"{name} is {len(text)} characters long, over the {max_chars} this node takes: shorten it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} holds invalid Unicode: an unpaired surrogate U+{ord(text[e.start]):04X} at "
                         f"character {e.start}, which no tokenizer can encode. Delete that character or retype "
                         f"the text.") from None
    return text


def check_prompt(prompt) -> str:
    return check_text(prompt, "prompt")


# ---- tensors ----------------------------------------------------------------------------------------------------

def check_image_batch(images, name: str = "image", max_batch: int = MAX_BATCH) -> torch.Tensor:
    """A ComfyUI IMAGE: a tensor ``[B, H, W, C]`` (C = 1, 3 or 4) with 1..max_batch non-empty images, finite."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be an IMAGE (a tensor [B, H, W, 3]), got {type(images).__name__}. Connect "
                         f"an IMAGE output such as LoadImage's.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE [B, H, W, 3], got a tensor of shape {tuple(images.shape)}. "
                         f"Connect an IMAGE output (a MASK or LATENT is not one).")
    if images.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}): the node before it produced no image. "
                         f"Check that node's inputs (a crop or a batch selection of size 0).")
    if images.shape[0] > max_batch:
        raise ValueError(f"{name} holds {images.shape[0]} images, over the {max_batch} this node takes at once: "
                         f"split the batch.")
    _check_finite_input(images, name)
    return images


def check_latent(latent, name: str = "latent") -> torch.Tensor:
    """A ComfyUI LATENT (``{"samples": [B, C, H, W]}``, non-empty, finite); returns the samples."""
    if not isinstance(latent, dict) or "samples" not in latent:
        got = f"a dict with keys {sorted(latent)}" if isinstance(latent, dict) else type(latent).__name__
        raise ValueError(f"{name} must be a LATENT (a dict with 'samples' [B, C, H, W]), got {got}. Connect the "
                         f"latent output of a sampler or VAE Encode.")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        got = f"shape {tuple(samples.shape)}" if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{name}['samples'] must be a tensor [B, C, H, W], got {got}. Connect the latent of an "
                         f"image sampler (video latents are 5-D).")
    if samples.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(samples.shape)}): the node before it produced no latent.")
    _check_finite_input(samples, name)
    return samples


def check_token_ids(ids, name: str, codebook_size: int) -> torch.Tensor:
    """Integer token ids ``[B, h, w]``, non-empty, each in ``[0, codebook_size)``."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 3:
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must hold integer token ids [B, h, w], got {got}. Connect the tokens output of "
                         f"an encode or sampler node.")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): there are no tokens to decode.")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"{name} holds ids {low}..{high}, outside the codebook 0..{codebook_size - 1}: they were "
                         f"made for another model.")
    return ids


def _check_finite_input(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf values of {x.numel()}: the node that made it failed "
                         f"numerically (often a model run in fp16). Fix that node first.")


def non_finite_cause(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "the model runs in fp16, whose range its activations exceed: load it in bf16 or fp32"
    return ("the checkpoint probably holds NaN/inf weights (an incomplete download or a bad conversion): "
            "download or convert it again")


def check_finite_output(x: torch.Tensor, stage: str, dtype: torch.dtype) -> torch.Tensor:
    """Raise NonFiniteOutput when ``x`` (the result of ``stage``, run in ``dtype``) holds NaN or inf."""
    if bool(torch.isfinite(x).all()):
        return x
    bad = int((~torch.isfinite(x)).sum())
    raise NonFiniteOutput(f"{stage} produced {bad} NaN or inf values of {x.numel()}; it is not passed on: "
                          f"{non_finite_cause(dtype)}.")
