"""Run by ComfyUI's own Python (see test_comfyui_files.py): ComfyUI's ``comfy.ops.scaled_fp8_ops`` Linear loads
the named layers of a scaled-FP8 file with ``load_state_dict(strict=True)`` and runs the given inputs.

    python comfyui_scaled_fp8_probe.py COMFYUI_TREE FILE INPUTS.safetensors OUT.safetensors

INPUTS holds ``<layer>`` -> input; OUT gets ``<layer>`` -> output, or the file ``OUT.error`` gets the load error.
"""
import os
import sys

comfyui, path, inputs_path, out_path = sys.argv[1:5]
sys.path.insert(0, comfyui)
os.chdir(comfyui)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]  # as the integration server runs

import comfy.ops  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=torch.float8_e4m3fn)
inputs = load_file(inputs_path)
outputs = {}
with safe_open(path, framework="pt") as f:
    for layer, x in inputs.items():
        weight = f.get_tensor(f"{layer}.weight")
        linear = ops.Linear(weight.shape[1], weight.shape[0], bias=True, device="cpu", dtype=torch.float8_e4m3fn)
        state = {name: f.get_tensor(f"{layer}.{name}") for name in ("weight", "bias", "scale_weight")}
        try:
            linear.load_state_dict(state, strict=True)
        except RuntimeError as e:
            with open(out_path + ".error", "w") as err:
                err.write(str(e))
            sys.exit(0)
        with torch.no_grad():
            outputs[layer] = linear(x).contiguous()
save_file(outputs, out_path)
