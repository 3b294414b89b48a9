"""LoRA on the pack's models, with ComfyUI's patch semantics.

The loaded base model is shared and never edited. A LoRA node returns a new handle (``with_lora``) carrying the
handle's LoRAs, each with its strength (stackable; negative and > 1 allowed), and a link to the base handle.
The patches reach the weights only while a stage runs the model:

- outside ComfyUI, ``installed`` adds one patch per patched layer to the pack's layers (``weight_patches`` of
  ``formats.layers``: applied, every call, to the weight dequantized to the compute dtype) and removes it after,
  so a plain, FP8 or GGUF base stays exactly as loaded;
- inside ComfyUI the handle's ModelPatcher is a clone of the base's with ComfyUI's LoRA patches added
  (``host.comfy_patcher.comfy_lora_patcher``, what core's LoraLoader does); ``PackModelPatcher`` there applies
  them.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..formats.layers import PackedLayer
from ..formats.lora_targets import Lora, LoraLayer


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA on a handle with its strength (the delta is multiplied by it)."""
    lora: Lora
    strength: float


def with_lora(handle, lora: Lora, strength: float):
    """A new handle of the same loaded model with ``lora`` at ``strength`` added after the handle's own LoRAs;
    ``handle`` itself is unchanged."""
    return dataclasses.replace(handle, loras=(*handle.loras, AppliedLora(lora, float(strength))),
                               base=handle.base or handle, patcher=None)


class LoraWeightPatch:
    """One layer's patch: ``weight + sum(strength * scale * up @ down)`` over the LoRAs that touch it, in the
    weight's dtype on its device (the factors are cast once per device and dtype)."""

    def __init__(self, terms: list[tuple[LoraLayer, float]]):
        self.terms = terms
        self._factors: dict[tuple[torch.device, torch.dtype], list] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.device, weight.dtype)
        factors = self._factors.get(key)
        if factors is None:
            factors = self._factors[key] = [
                (layer.up.to(device=weight.device, dtype=weight.dtype),
                 layer.down.to(device=weight.device, dtype=weight.dtype), strength * layer.scale)
                for layer, strength in self.terms]
        for up, down, alpha in factors:
            weight = torch.addmm(weight, up, down, alpha=alpha)
        return weight


def layer_patches(loras: Sequence[AppliedLora]) -> dict[str, LoraWeightPatch]:
    """The pack's module name -> its patch, for every layer some LoRA with a non-zero strength touches."""
    terms: dict[str, list[tuple[LoraLayer, float]]] = {}
    for applied in loras:
        if applied.strength == 0:
            continue
        for module, layer in applied.lora.layers.items():
            terms.setdefault(module, []).append((layer, applied.strength))
    return {module: LoraWeightPatch(t) for module, t in terms.items()}


@contextmanager
def installed(model: nn.Module, loras: Sequence[AppliedLora]):
    """The LoRAs' patches on ``model``'s layers while the block runs; removed after, whatever happens."""
    patches = layer_patches(loras)
    modules = dict(model.named_modules()) if patches else {}
    added = []
    try:
        for name, patch in patches.items():
            layer = modules.get(name)
            if not isinstance(layer, PackedLayer):
                raise TypeError(f"LoRA: {name} of {type(model).__name__} is not one of the pack's layers, so it "
                                f"cannot take a weight patch; load the model with the pack's loader.")
            layer.add_weight_patch(patch)
            added.append((layer, patch))
        yield model
    finally:
        for layer, patch in added:
            layer.weight_patches.remove(patch)
