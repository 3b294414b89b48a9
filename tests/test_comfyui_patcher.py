"""The pack's ModelPatcher inside the real ComfyUI 0.3.64 (GLMIMAGE_COMFYUI; skipped otherwise): LoRA patches on
plain and packed weights through ComfyUI's own patch_model / unpatch_model, and a loader output dropped by the
cache freed and reloaded. The 2026 signatures are tested against fakes in test_comfy_2026_contracts.py."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from comfyui_server import AVAILABLE, COMFYUI, PYTHON, ROOT, SKIP_REASON
from glm_image_nodes.testing.tiny_release import write_tiny_release

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfyui_patcher_probe.py")


@pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)
def test_pack_patcher_in_comfyui_0_3_64(tmp_path):
    release = write_tiny_release(str(tmp_path / "tiny"))
    done = subprocess.run([PYTHON, PROBE, COMFYUI, ROOT, release], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["host_memory_sees_comfyui"]
    assert found["plain_patched_err"] <= 1e-6 and found["packed_patched_err"] <= 1e-6
    assert found["packed_storage_unchanged"] and found["plain_restored"] and found["packed_patch_removed"]
    assert found["loaded_models_after_run"] == 1 and found["loaded_models_after_eviction"] == 0
    assert found["reloaded_equal"]
    # a partial load: the stage runs on the device on_compute_device yields (ComfyUI's), the same result
    assert found["partially_loaded"] and found["partial_yielded"] == [found["comfy_device"]]
    assert found["partial_input_devices"] == [found["comfy_device"]]
    assert found["partial_device_attributes"] == [] and found["partial_equal"]
