"""How the AR decode steps may run for one generation: compiled without a recompile per prompt length,
eager when a compile limit is hit, and never captured where weights are copied or computed per call.

- ``compiled`` guards on the shapes of the KV cache and the decode buffers; their lengths are rounded up to
  ``BUCKET`` slots, so prompts of different lengths share one compiled step (slots past the current one are
  never attended to, and the rope/output rows past the grid are never read).
- Past torch's recompile limit a ``fullgraph`` compile raises; the step then runs eagerly (same tokens) with
  one log line, instead of failing the workflow.
- A CUDA graph (and ``fullgraph`` tracing) cannot hold a weight patch that copies or computes the weight on
  every call, such as ComfyUI's ``LowVramPatch`` (a LoRA on a packed FP8/GGUF layer copies its factors from
  pageable CPU memory per call): such a model decodes eagerly, decided once the KV cache is allocated.
"""
from __future__ import annotations

import logging

import torch
import torch._dynamo.exc

log = logging.getLogger("glm_image_nodes")

BUCKET = 256  # slots: at most 255 padding slots per sample (a few MB of KV cache at the release's sizes)
RECOMPILE_LIMIT_ERRORS = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit",
                                                                             "FailOnCacheLimitHit")
                               if hasattr(torch._dynamo.exc, name))
_said: set[str] = set()


def say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.warning("glm-image: %s", message)


def bucketed(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _comfy_low_vram_patch(patch) -> bool:
    """ComfyUI's ``LowVramPatch`` or a subclass (the pack's ``PackedWeightPatch``): by name, no comfy import."""
    return any(cls.__name__ == "LowVramPatch" for cls in type(patch).__mro__)


def per_call_weight_patches(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose weight or bias a ComfyUI patch recomputes on every call from factors it copies
    in: anything in ComfyUI's ``weight_function`` / ``bias_function`` lists (partial loads), and the
    ``PackedWeightPatch`` (a ``LowVramPatch``) that ``PackModelPatcher`` puts in a fully loaded FP8/GGUF layer's
    ``weight_patches``. The pack's own LoRA patches keep their factors on the device and are captured."""
    return [name for name, module in model.named_modules()
            if getattr(module, "weight_function", None) or getattr(module, "bias_function", None)
            or any(_comfy_low_vram_patch(p) for p in getattr(module, "weight_patches", ()))]


def off_device(model: torch.nn.Module, device: torch.device) -> bool:
    return any(p.device != device for p in model.parameters())


def steps_for(model: torch.nn.Module, decode_steps: str, device: torch.device) -> str:
    """``decode_steps``, or ``eager`` (one log line) where the step cannot be captured or traced whole."""
    if decode_steps == "eager":
        return decode_steps
    patched = per_call_weight_patches(model)
    if patched:
        say_once("per_call_patch", f"decode_steps {decode_steps!r} refused: {len(patched)} layer(s) of the AR model "
                                   f"(e.g. {patched[0]}) patch their weights on every call (a LoRA on FP8/GGUF "
                                   f"weights in ComfyUI's low-VRAM mode), which a captured or compiled step cannot "
                                   f"hold; decoding eagerly. Fix: load the AR in bf16, or merge the LoRA.")
        return "eager"
    if device.type == "cuda" and off_device(model, device):
        say_once("offload", f"decode_steps {decode_steps!r} refused: part of the AR model is on the offload device "
                            f"after the KV cache was allocated (block swap or a partial load); decoding eagerly.")
        return "eager"
    return decode_steps


class CompiledStep:
    """The compiled decode step, which runs the eager ``step`` from the first time a compile limit is hit."""

    def __init__(self, compiled, step):
        self.compiled, self.step, self.fell_back = compiled, step, False

    def __call__(self, *args) -> None:
        if not self.fell_back:
            try:
                return self.compiled(*args)
            except RECOMPILE_LIMIT_ERRORS as error:  # raised before the step ran: its state is untouched
                self.fell_back = True
                say_once("recompile_limit", f"decode_steps 'compiled' hit torch's recompile limit "
                                            f"({type(error).__name__}); this generation decodes eagerly (same "
                                            f"tokens). Fix: raise torch._dynamo.config.recompile_limit, or use "
                                            f"'cuda graph'.")
        return self.step(*args)
