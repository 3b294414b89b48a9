"""Run by ComfyUI's own Python (see test_comfyui_patcher.py): the pack's PackModelPatcher with the real
comfy.model_patcher / model_management of that ComfyUI; prints one JSON object of what it found.

    python comfyui_patcher_probe.py COMFYUI_TREE PACK_ROOT RELEASE
"""
import gc
import json
import os
import sys

comfyui, pack_root, release = sys.argv[1:4]
sys.path[:0] = [comfyui, pack_root]
os.chdir(comfyui)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]

import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

from standalone import register_pack  # noqa: E402

register_pack()
from glm_image_nodes.core.formats import ggml  # noqa: E402
from glm_image_nodes.core.formats.layers import Packed, adopt  # noqa: E402
from glm_image_nodes.core.host import memory  # noqa: E402
from glm_image_nodes.core.host.comfy_patcher import PackModelPatcher  # noqa: E402
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES  # noqa: E402

found = {"host_memory_sees_comfyui": memory._mm is not None}

# patches on a plain and a GGUF-packed weight, through ComfyUI's own patch_model / unpatch_model
g = torch.Generator().manual_seed(0)
plain, packed = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
for layer in (plain, packed):
    adopt(layer, torch.float32)
plain.assign_weight(torch.randn(32, 64, generator=g), torch.device("cpu"))
packed.assign_weight(Packed(ggml.quantize(torch.randn(32, 64, generator=g), ggml.QTYPES["Q8_0"]), "Q8_0", (32, 64)),
                     torch.device("cpu"))
container = torch.nn.Module()
container.net = torch.nn.Sequential(plain, packed)
patcher = PackModelPatcher(container, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
deltas = {f"net.{i}.weight": 0.05 * torch.randn(32, 64, generator=g) for i in (0, 1)}
patcher.add_patches({k: ("diff", (v,)) for k, v in deltas.items()})
stored = [plain.weight.clone(), packed.weight.clone()]
dense = [plain.compute_weight(torch.device("cpu")), packed.compute_weight(torch.device("cpu"))]
patcher.patch_model()
for name, layer, i in (("plain", plain, 0), ("packed", packed, 1)):
    patched = layer.compute_weight(torch.device("cpu"))
    found[f"{name}_patched_err"] = (patched - dense[i] - deltas[f"net.{i}.weight"]).abs().max().item()
found["packed_storage_unchanged"] = torch.equal(packed.weight, stored[1])
patcher.unpatch_model()
found["plain_restored"] = torch.equal(plain.weight, stored[0])
found["packed_patch_removed"] = not packed.weight_patches

# a loader output dropped by the cache: the model is freed, ComfyUI forgets it, a new load runs
(handle,) = NODES["GLMImageGlyphEncoderLoader"]().load(release, "fp32")
ids = torch.tensor([[5, 6, 7, 1]])
with memory.on_compute_device(handle):
    before = handle.model(ids)
found["loaded_models_after_run"] = len(mm.current_loaded_models)
del handle
gc.collect()
mm.cleanup_models_gc()
mm.cleanup_models()
found["loaded_models_after_eviction"] = len(mm.current_loaded_models)
(again,) = NODES["GLMImageGlyphEncoderLoader"]().load(release, "fp32")
with memory.on_compute_device(again):
    found["reloaded_equal"] = torch.equal(again.model(ids), before)

# a partial load, as ComfyUI makes it when the card is too small (forced here: a CPU-only ComfyUI loads whole):
# the node's stage computes on the device on_compute_device yields, and no module gets a device attribute
(partial,) = NODES["GLMImageGlyphEncoderLoader"]().load(release, "fp32")
glyph_node = NODES["GLMImageGlyphConditioning"]()
whole = glyph_node.encode(partial, 'a "SALE" sign')[0]
real_load = mm.load_models_gpu


def load_partially(models, **options):
    real_load(models, **options)
    for model in models:
        model.partially_unload(model.offload_device, memory_to_free=2**40)


seen = {"devices": set(), "attributes": set()}


def spy(module, args):
    seen["devices"].update(str(a.device) for a in args if isinstance(a, torch.Tensor))
    seen["attributes"].update(key for m in partial.module.modules() for key in m.__dict__ if "device" in key)


hook = partial.module.register_forward_pre_hook(spy)
mm.load_models_gpu = load_partially
yielded = []
real_on_compute_device = memory.on_compute_device


def on_compute_device(*items, **options):
    placement = real_on_compute_device(*items, **options)

    class Recorded:
        def __enter__(self):
            device = placement.__enter__()
            yielded.append(str(device))
            found["partially_loaded"] = bool(getattr(partial.patcher.model, "model_lowvram", False))
            return device

        def __exit__(self, *exc):
            return placement.__exit__(*exc)
    return Recorded()


memory.on_compute_device = on_compute_device
try:
    parted = glyph_node.encode(partial, 'a "SALE" sign')[0]
finally:
    mm.load_models_gpu, memory.on_compute_device = real_load, real_on_compute_device
    hook.remove()
found["partial_yielded"] = yielded
found["partial_input_devices"] = sorted(seen["devices"])
found["partial_device_attributes"] = sorted(seen["attributes"])
found["partial_equal"] = torch.equal(parted.cond, whole.cond) and torch.equal(parted.uncond, whole.uncond)
found["comfy_device"] = str(mm.get_torch_device())
print(json.dumps(found))
