"""The ComfyUI ``ModelPatcher`` of the pack's models (imported only inside ComfyUI).

ComfyUI applies a patcher's patches (LoRAs added with ``add_patches``) when it loads the model: a fully loaded
weight is replaced by a patched copy, the stored one kept as the backup that ``unpatch_model`` puts back; a
weight left on the offload device (partial loading) gets a ``LowVramPatch`` in the layer's ``weight_function``,
which the pack's layers apply to the dequantized weight on every call. The one case ComfyUI's own code gets
wrong for the pack is a fully loaded FP8 or GGUF weight: it would patch the stored (packed) tensor. Here such a
weight keeps its stored form and gets the same per-call patch instead (as ComfyUI-GGUF's patcher does), so a
quantized model is never re-quantized; ``unpatch_model`` removes it.
"""
from __future__ import annotations

from typing import Sequence

import comfy.model_patcher
import comfy.utils

from ..formats.layers import PackedLayer
from ..formats.lora_targets import Lora
from ..loading.lora_patches import AppliedLora


class PackedWeightPatch(comfy.model_patcher.LowVramPatch):
    """ComfyUI's patch of one weight, computed on the layer's dequantized weight each call (on a copy: ComfyUI
    patches in place)."""

    def __call__(self, weight):
        return super().__call__(weight.clone())


class PackModelPatcher(comfy.model_patcher.ModelPatcher):
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key in self.patches and key.endswith(".weight"):
            layer = comfy.utils.get_attr(self.model, key[:-len(".weight")])
            if isinstance(layer, PackedLayer) and layer.is_packed:
                if not any(isinstance(p, PackedWeightPatch) for p in layer.weight_patches):
                    layer.weight_patches.append(PackedWeightPatch(key, self.patches))
                return
        super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for module in self.model.modules():
                if isinstance(module, PackedLayer):
                    module.weight_patches[:] = [p for p in module.weight_patches
                                                if not isinstance(p, PackedWeightPatch)]
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)


def comfy_patches(lora: Lora, prefix: str) -> dict:
    """``lora`` as ComfyUI's patches: ``{"<prefix><module>.weight": LoRAAdapter}`` with alpha = scale * rank (ComfyUI
    scales by alpha / rank)."""
    from comfy.weight_adapter import LoRAAdapter

    return {f"{prefix}{module}.weight": LoRAAdapter(set(), (layer.up, layer.down, layer.scale * layer.rank,
                                                            None, None, None))
            for module, layer in lora.layers.items()}


def comfy_lora_patcher(base_patcher, loras: Sequence[AppliedLora], prefix: str):
    """A clone of ``base_patcher`` with each LoRA added at its strength (core LoraLoader's ``add_patches``)."""
    patcher = base_patcher.clone()
    for applied in loras:
        if applied.strength != 0:
            patcher.add_patches(comfy_patches(applied.lora, prefix), applied.strength)
    return patcher
