"""The pack's side of the ComfyUI 2026 contracts, against fakes of the 2026 methods (comfy2026_fakes.py cites
the file and commit each mirrors). The same patcher against the real ComfyUI 0.3.64: test_comfyui_files.py."""
from __future__ import annotations

import gc
import importlib
import sys
import weakref

import comfy2026_fakes as fakes
import pytest
import torch
from glm_image_nodes.core.formats import ggml
from glm_image_nodes.core.formats.layers import Packed, adopt

PATCHER_MODULE = "glm_image_nodes.core.host.comfy_patcher"
# A LoRA delta on a fully loaded weight, against the pack's float32 patch (max abs error / max |patched weight|):
FP32_TOLERANCE = 1e-6             # ComfyUI computing in float32 (0.3.64; 2026 on CPUs and older GPUs)
FP16_TOLERANCE = 3 * 2.0 ** -11   # 2026 on fp16 GPUs: the weight and the delta each rounded to float16 (half an
#                                   ulp, 2^-11 relative), the sum once more, then cast back (float.py: a plain cast
#                                   for float32/bfloat16 targets; stochastic rounding only for FP8 weights)


def patcher_module(monkeypatch, **options):
    calls = fakes.install(monkeypatch, **options)
    monkeypatch.delitem(sys.modules, PATCHER_MODULE, raising=False)
    return importlib.import_module(PATCHER_MODULE), calls


def tiny_model():
    """A container as host.memory builds it: the pack's Linear with a plain weight and one GGUF Q8_0 weight."""
    g = torch.Generator().manual_seed(0)
    plain, packed = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    for layer in (plain, packed):
        adopt(layer, torch.float32)
    plain.assign_weight(torch.randn(32, 64, generator=g), torch.device("cpu"))
    w = torch.randn(32, 64, generator=g)
    packed.assign_weight(Packed(ggml.quantize(w, ggml.QTYPES["Q8_0"]), "Q8_0", (32, 64)), torch.device("cpu"))
    container = torch.nn.Module()
    container.net = torch.nn.Sequential(plain, packed)
    return container


def diff_patches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"net.{i}.weight": ("diff", (0.05 * torch.randn(32, 64, generator=g),)) for i in (0, 1)}


def test_overrides_take_and_pass_on_the_2026_keywords(monkeypatch):
    module, _ = patcher_module(monkeypatch, compute_dtype=torch.float32)
    model = tiny_model()
    patcher = module.PackModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patches = diff_patches()
    patcher.add_patches(patches)
    stored_plain = model.net[0].weight.clone()
    stored_packed = model.net[1].weight.clone()
    # model saving (LazyCastingParam.to): return_weight=True gives the patched weight, changes nothing
    for i in (0, 1):
        weight = patcher.patch_weight_to_device(f"net.{i}.weight", device_to=torch.device("cpu"), return_weight=True)
        want = model.net[i].compute_weight(torch.device("cpu")) + patches[f"net.{i}.weight"][1][0]
        assert torch.allclose(weight, want, atol=1e-6)
    assert torch.equal(model.net[0].weight, stored_plain) and torch.equal(model.net[1].weight, stored_packed)
    assert not patcher.backup and not model.net[1].weight_patches
    # force_cast (the dynamic loader's force_load_param) reaches ComfyUI's method for a plain weight
    patcher.patch_weight_to_device("net.0.weight", device_to=torch.device("cpu"), force_cast=True)
    assert torch.allclose(model.net[0].weight, stored_plain + patches["net.0.weight"][1][0], atol=1e-6)
    # the packed weight stays packed and gets its per-call patch
    patcher.patch_weight_to_device("net.1.weight", device_to=torch.device("cpu"), force_cast=True)
    assert torch.equal(model.net[1].weight, stored_packed) and len(model.net[1].weight_patches) == 1
    patcher.unpatch_model()
    assert torch.equal(model.net[0].weight, stored_plain) and not model.net[1].weight_patches


def test_no_pinning_of_mapped_weights_and_no_unpin_errors(monkeypatch):
    module, calls = patcher_module(monkeypatch)
    patcher = module.PackModelPatcher(tiny_model(), torch.device("cpu"), torch.device("cpu"))
    for key in ("net.0.weight", "net.0.bias", "net.1.weight"):
        patcher.pin_weight_to_device(key)  # what a 2026 partial load calls for each offloaded weight
    assert calls.pinned == [] and patcher.pinned == set()
    patcher.unpin_all_weights()            # and what unloading calls: nothing to undo, no error
    assert calls.unpinned == []


def test_opts_out_of_dynamic_vram_per_model(monkeypatch):
    module, _ = patcher_module(monkeypatch)
    patcher = module.PackModelPatcher(tiny_model(), torch.device("cpu"), torch.device("cpu"))
    assert patcher.is_dynamic() is False
    assert not isinstance(patcher, sys.modules["comfy.model_patcher"].ModelPatcherDynamic)


@pytest.mark.parametrize("compute_dtype,tolerance", [(torch.float32, FP32_TOLERANCE),
                                                     (torch.float16, FP16_TOLERANCE)])
def test_lora_on_a_loaded_weight_matches_the_packs_patch(monkeypatch, compute_dtype, tolerance):
    """ComfyUI patches a fully loaded plain weight itself, in ``lora_compute_dtype``; the pack patches a packed
    (or partly loaded) one per call in float32. Both give the same weight within the stated tolerance."""
    module, _ = patcher_module(monkeypatch, compute_dtype=compute_dtype)
    model = tiny_model()
    patcher = module.PackModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patches = diff_patches()
    patcher.add_patches(patches)
    ours = module.PackedWeightPatch("net.0.weight", patcher.patches)(model.net[0].compute_weight(torch.device("cpu")))
    patcher.patch_weight_to_device("net.0.weight", device_to=torch.device("cpu"))
    theirs = model.net[0].weight
    err = ((theirs - ours).abs().max() / ours.abs().max()).item()
    assert err <= tolerance, err
    if compute_dtype == torch.float16:
        assert err > FP32_TOLERANCE  # the fp16 path really rounds (the tolerance is needed)


def test_an_evicted_loader_output_frees_its_model_and_reloads_cleanly(tmp_path):
    """RAM-pressure caching drops a loader's output (the handle); nothing of the pack keeps the model alive, and
    running the loader again gives a model that computes the same."""
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
    from glm_image_nodes.testing.tiny_release import write_tiny_release

    release = write_tiny_release(str(tmp_path / "tiny"))
    (handle,) = NODES["GLMImageGlyphEncoderLoader"]().load(release, "fp32")
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        before = handle.model(ids)
    alive = weakref.ref(handle.model)
    del handle
    gc.collect()
    assert alive() is None
    (again,) = NODES["GLMImageGlyphEncoderLoader"]().load(release, "fp32")
    with torch.no_grad():
        assert torch.equal(again.model(ids), before)
