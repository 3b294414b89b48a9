"""The GLM-Image System Check node: the machine report of ``glm-image-check``, shown on the node."""
from __future__ import annotations

from ..core.runtime import devices
from ..core.stages.system_check import format_report, report
from .common import category


class GLMImageSystemCheck:
    DESCRIPTION = ("Reports what this machine gives the pack: GPU, compute capability, torch / CUDA / cuDNN / Triton "
                   "/ driver versions, free VRAM and RAM, which fused kernels passed their self-check (and why not), "
                   "FP8 GEMM and Sage/Flash attention availability, and the attention kernels torch picks. Paste the "
                   "text into a bug report.")
    CATEGORY = category("utils")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "check"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # free memory changes: check again on every run

    def check(self):
        text = format_report(report(devices.get_device()))
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"GLMImageSystemCheck": GLMImageSystemCheck}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageSystemCheck": "GLM-Image System Check"}
