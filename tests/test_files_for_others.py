"""What convert.py writes, read by other tools: ComfyUI's scaled-FP8 layout by default (checked with ComfyUI
0.3.64's own ``comfy.ops`` when GLMIMAGE_COMFYUI is set), GGUF metadata as city96's convert.py writes it."""
from __future__ import annotations

import os
import subprocess

import gguf
import pytest
import torch
from comfyui_server import AVAILABLE, COMFYUI, PYTHON, SKIP_REASON
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.formats import fp8
from glm_image_nodes.core.models import glm_image_dit
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.testing.tiny_release import write_tiny_release
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfyui_scaled_fp8_probe.py")
LAYERS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "transformer_blocks.0.norm1.linear")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("for_others")
    release = write_tiny_release(str(folder / "tiny"))
    out = {}
    for name, fmt, scale in (("default", "fp8_e4m3fn", "tensor"), ("channel", "fp8_e4m3fn", "channel"),
                             ("q4_k", "q4_k", "tensor"), ("q8_0", "q8_0", "tensor")):
        out[name] = str(folder / f"dit_{name}{conversion.extension(fmt)}")
        conversion.convert_component(glm_image_dit.SPEC, release, fmt, out[name], fp8_scale=scale)
    return out


def test_default_fp8_file_has_comfyuis_scalar_scales(files):
    with safe_open(files["default"], framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert fp8.MARKER in keys and f.get_tensor(fp8.MARKER).dtype == torch.float8_e4m3fn
        scales = [k for k in keys if k.endswith(".scale_weight")]
        assert scales and all(f.get_tensor(k).shape == () and f.get_tensor(k).dtype == torch.float32 for k in scales)
        fp8_weights = [k for k in keys if f.get_slice(k).get_dtype() == "F8_E4M3" and k != fp8.MARKER]
        assert {k.rsplit(".", 1)[0] for k in scales} == {k.rsplit(".", 1)[0] for k in fp8_weights}
    assert meta[conversion.META_FP8_LAYOUT].startswith("comfyui scaled_fp8")  # the layout it says it has


def test_per_channel_file_says_it_is_not_comfyuis_layout(files):
    with safe_open(files["channel"], framework="pt") as f:
        assert "NOT ComfyUI's scaled-FP8 layout" in f.metadata()[conversion.META_FP8_LAYOUT]
        assert f.get_tensor(LAYERS[0] + ".scale_weight").shape == (64, 1)
    assert load_decoder(files["channel"], "fp32", "cpu").transformer_blocks[0].attn1.to_q.weight_kind == "fp8"


@pytest.mark.parametrize("name,file_type", [("q4_k", gguf.LlamaFileType.MOSTLY_Q4_K_M),
                                            ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0)])
def test_gguf_carries_city96s_general_metadata(files, name, file_type):
    fields = gguf.GGUFReader(files[name]).fields
    assert fields["general.file_type"].contents() == file_type.value
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert fields["general.architecture"].contents() == "glm_image_dit"


def pack_outputs(path: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dit = load_decoder(path, "fp32", "cpu")
    with torch.no_grad():
        return {layer: dit.get_submodule(layer)(x) for layer, x in inputs.items()}


def run_comfyui_probe(path: str, inputs: dict[str, torch.Tensor], tmp_path) -> dict[str, torch.Tensor] | str:
    inputs_file, out = str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")
    save_file(inputs, inputs_file)
    done = subprocess.run([PYTHON, PROBE, COMFYUI, path, inputs_file, out], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if os.path.exists(out + ".error"):
        return open(out + ".error").read()
    return load_file(out)


@pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)
@pytest.mark.parametrize("rows", [1, 300])  # ComfyUI scales the input (small batch) or the weight (large)
def test_comfyuis_scaled_fp8_layer_loads_the_default_file_and_agrees(files, tmp_path, rows):
    g = torch.Generator().manual_seed(rows)
    with safe_open(files["default"], framework="pt") as f:
        inputs = {layer: torch.randn(rows, f.get_slice(f"{layer}.weight").get_shape()[1], generator=g)
                  for layer in LAYERS}
        bias_rounding = {layer: (f.get_tensor(f"{layer}.bias").float()
                                 - f.get_tensor(f"{layer}.bias").to(torch.float8_e4m3fn).float()).abs().max()
                         for layer in LAYERS}
    theirs = run_comfyui_probe(files["default"], inputs, tmp_path)
    assert isinstance(theirs, dict), theirs
    ours = pack_outputs(files["default"], inputs)
    for layer in LAYERS:
        # ComfyUI stores the bias in float8 (override_dtype), the pack keeps the file's: the outputs differ by
        # that rounding (plus float32 summation order, 1e-5 of the output's scale)
        err = (theirs[layer] - ours[layer]).abs().max()
        assert err <= bias_rounding[layer] + 1e-5 * ours[layer].abs().max(), (layer, err, bias_rounding[layer])
        assert ours[layer].abs().max() > 10 * bias_rounding[layer]  # the comparison is not vacuous


@pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)
def test_comfyui_refuses_the_per_channel_file(files, tmp_path):
    """Why the default changed: ComfyUI's scaled-FP8 layer has a scalar scale_weight."""
    inputs = {LAYERS[0]: torch.randn(1, 64)}
    assert "size mismatch for scale_weight" in run_comfyui_probe(files["channel"], inputs, tmp_path)
