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

import comfy.lora
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
    """The pack's models in ComfyUI's memory management (see docs/comfyui_2026.md for the 2026 contracts).

    - ``patch_weight_to_device`` takes the keywords ComfyUI added after 0.3.64 (``return_weight``,
      ``force_cast``; comfy/model_patcher.py at 08d0e510) and passes them on, only when set, so 0.3.64's
      three-argument method is still called as it expects.
    - Dynamic VRAM (comfy-aimdo, ``ModelPatcherDynamic``): the pack opts out per model (``is_dynamic`` False).
      Its load path stages weights through comfy.ops' cast functions (``comfy_cast_weights`` with ``_v`` vbar
      allocations, ops-time pinning); the pack's Linear/Embedding dequantize and patch their weight themselves
      each call, so they cannot take part. ComfyUI's ``load_models_gpu`` then frees memory the old way for the
      pack's own calls only (``free_for_dynamic`` is per call), and ``free_memory`` unloads only the shortfall.
    - Pinned offload: never pins. The pack's CPU weights are memory-mapped file pages (or GGUF byte views);
      ``cudaHostRegister`` on them would lock the whole mapped file into RAM, and ``unpin_weight`` of a weight
      whose ``.data`` the pack swapped per call would fail. No key enters ``self.pinned``, so ComfyUI's
      ``unpin_weight`` / ``unpin_all_weights`` have nothing to undo.
    """

    def is_dynamic(self):
        return False

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                               force_cast=False, **newer):
        layer = _packed_layer(self.model, key)
        if layer is not None:
            if return_weight:  # a patched copy for the caller (model saving); the stored weight stays packed
                weight = layer.compute_weight(device_to or layer.weight.device)
                if key in self.patches:
                    weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
                return weight
            if key in self.patches and not any(isinstance(p, PackedWeightPatch) for p in layer.weight_patches):
                layer.weight_patches.append(PackedWeightPatch(key, self.patches))
            return None
        given = {**newer, **({"return_weight": True} if return_weight else {}),
                 **({"force_cast": True} if force_cast else {})}
        return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update, **given)

    def pin_weight_to_device(self, key):
        """Never pin (see the class docstring); ComfyUI 2026 calls this for offloaded weights of partial loads."""
        return None

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


def _packed_layer(model, key: str) -> PackedLayer | None:
    """The pack's layer whose packed (FP8 / GGUF) weight ``key`` names, else None."""
    if not key.endswith(".weight"):
        return None
    layer = comfy.utils.get_attr(model, key[:-len(".weight")])
    return layer if isinstance(layer, PackedLayer) and layer.is_packed else None
