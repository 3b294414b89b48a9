"""Small fakes of the ComfyUI 2026 methods the pack's patcher meets, each mirroring the named source file at the
named commit of Comfy-Org/ComfyUI (read there; no ComfyUI code is copied beyond the signatures and the steps
that matter to the pack). ``install(monkeypatch)`` puts them in ``sys.modules`` as ``comfy.*``.
"""
from __future__ import annotations

import collections
import sys
import types

import torch

MODEL_PATCHER = "comfy/model_patcher.py @ 08d0e510f4e539a1db39072589817136ac6cfa7d"
MODEL_MANAGEMENT = "comfy/model_management.py @ 02b2b3886164b1fa412d393a3ed0674b9d1cf010"
FLOAT = "comfy/float.py @ 86d9f43e95ff66e1d64bcfa5942f0f69eebc4105"
LORA = "comfy/lora.py @ ec93dcacb96b922f7cb1417b3ba22bccb082df32"


class Calls:
    """What the fakes were asked to do (pinning, unpinning), for the tests to check."""

    def __init__(self):
        self.pinned: list[int] = []
        self.unpinned: list[int] = []


def get_attr(obj, attr: str):
    """comfy/utils.py ``get_attr``: a dotted attribute path."""
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_param(obj, attr: str, value):
    *path, name = attr.split(".")
    setattr(get_attr(obj, ".".join(path)) if path else obj, name, torch.nn.Parameter(value, requires_grad=False))


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """``LORA`` ``calculate_weight`` for the "diff" patches the tests use: ``weight + strength * diff``, the diff
    cast to ``intermediate_dtype`` first and the sum in the weight's dtype."""
    for strength, value, strength_model, offset, function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        kind, (diff,) = value
        assert kind == "diff"
        weight += strength * diff.to(intermediate_dtype).to(weight.dtype)
    return weight


def install(monkeypatch, *, compute_dtype=torch.float16) -> Calls:
    """Fake ``comfy`` modules; ``compute_dtype``: what ``lora_compute_dtype`` answers (``MODEL_MANAGEMENT``:
    float16 where ``should_use_fp16(device)``, e.g. any recent NVIDIA GPU; float32 elsewhere)."""
    calls = Calls()
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.get_attr, utils.set_attr_param = get_attr, set_attr_param
    utils.string_to_seed = lambda data: 0
    lora = types.ModuleType("comfy.lora")
    lora.calculate_weight = calculate_weight
    mm = types.ModuleType("comfy.model_management")
    mm.lora_compute_dtype = lambda device: compute_dtype

    def pin_memory(tensor):  # MODEL_MANAGEMENT pin_memory: cudaHostRegister of the tensor's storage
        calls.pinned.append(tensor.data_ptr())
        return True

    def unpin_memory(tensor):  # cudaHostUnregister: an error for memory that was never registered
        if tensor.data_ptr() not in calls.pinned:
            raise RuntimeError("cudaHostUnregister: memory was not registered")
        calls.unpinned.append(tensor.data_ptr())
        return True

    mm.pin_memory, mm.unpin_memory = pin_memory, unpin_memory
    float_ = types.ModuleType("comfy.float")
    # ``FLOAT`` stochastic_rounding: plain casts for float32/float16/bfloat16 (stochastic only for FP8 targets)
    float_.stochastic_rounding = lambda value, dtype, seed=0: value.to(dtype)
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.LowVramPatch = _low_vram_patch(lora)
    patcher.ModelPatcher = _model_patcher(utils, lora, mm, float_)
    patcher.ModelPatcherDynamic = _dynamic(patcher.ModelPatcher)
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.lora", lora),
                         ("comfy.model_management", mm), ("comfy.float", float_), ("comfy.model_patcher", patcher)):
        if name != "comfy":
            setattr(comfy, name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def _low_vram_patch(lora):
    class LowVramPatch:
        """``MODEL_PATCHER`` LowVramPatch: ``__call__(weight)`` = calculate_weight in the weight's dtype."""

        def __init__(self, key, patches, convert_func=None, set_func=None):
            self.key, self.patches = key, patches
            self.prepared_patches = None

        def __call__(self, weight):
            return lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)

    return LowVramPatch


def _model_patcher(utils, lora, mm, float_):
    class ModelPatcher:
        """``MODEL_PATCHER`` ModelPatcher: the methods with the 2026 signatures the pack overrides or meets."""

        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False,
                     fast_disk=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.patches, self.backup, self.pinned = {}, {}, set()
            self.weight_inplace_update = weight_inplace_update

        def is_dynamic(self):
            return False

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            for key, value in patches.items():
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
            return list(patches)

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                                   force_cast=False):
            weight = utils.get_attr(self.model, key)
            if key not in self.patches and not force_cast:
                return weight
            if key not in self.backup and not return_weight:
                self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(weight, False)
            temp_dtype = mm.lora_compute_dtype(device_to) if key in self.patches else None
            temp = weight.to(temp_dtype, copy=True)
            out = lora.calculate_weight(self.patches[key], temp, key) if key in self.patches else temp
            out = float_.stochastic_rounding(out, weight.dtype, seed=utils.string_to_seed(key))
            if return_weight:
                return out
            utils.set_attr_param(self.model, key, out)

        def pin_weight_to_device(self, key):
            if mm.pin_memory(utils.get_attr(self.model, key)):
                self.pinned.add(key)

        def unpin_weight(self, key):
            if key in self.pinned:
                mm.unpin_memory(utils.get_attr(self.model, key))
                self.pinned.remove(key)

        def unpin_all_weights(self):
            for key in list(self.pinned):
                self.unpin_weight(key)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for key, backup in self.backup.items():
                    utils.set_attr_param(self.model, key, backup.weight)
                self.backup.clear()

    return ModelPatcher


def _dynamic(base):
    class ModelPatcherDynamic(base):
        """``MODEL_PATCHER`` ModelPatcherDynamic: dynamic VRAM; pinning is deferred to ops time and the
        per-key pin API raises."""

        def is_dynamic(self):
            return True

        def pin_weight_to_device(self, key):
            raise RuntimeError("pin_weight_to_device invalid for dymamic weight loading")

    return ModelPatcherDynamic
