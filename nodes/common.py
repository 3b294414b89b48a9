"""Shared bits of the node layer: categories, widget definitions, model-file choices."""
from __future__ import annotations

import torch

from ..core.runtime import comfy_compat
from ..core.runtime.attention import BACKENDS
from ..core.runtime.geometry import MAX_SIDE, SIDE_MULTIPLE
from ..core.runtime.loading import resolve_dtype

CATEGORY = "GLM-Image"
DTYPES = ["auto", "bf16", "fp32", "fp16"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def checkpoint_choices(single_file_folder: str) -> list[str]:
    """Release folders of ``models/glm_image`` plus single files of ``models/<single_file_folder>``.

    Outside ComfyUI nothing is listed; the loaders also accept a path.
    """
    return comfy_compat.list_release_folders() + comfy_compat.list_single_files(single_file_folder)


def checkpoint_input(single_file_folder: str, tooltip: str):
    choices = checkpoint_choices(single_file_folder)
    # Marks a combo whose values are model files: the workflow validation test accepts any string there.
    return (choices, {"tooltip": tooltip, "glm_model_file": single_file_folder})


def dtype_input():
    return (DTYPES, {"default": "auto", "tooltip": "Weight dtype. auto: bf16 on GPUs that support it, else fp32."})


def load_dtype(choice: str) -> str:
    """Loaders keep weights on the offload device; ``auto`` still means what suits the compute device."""
    if choice != "auto":
        return choice
    return "bf16" if resolve_dtype("auto", comfy_compat.get_device(), component="model") == torch.bfloat16 else "fp32"


def seed_input():
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Same seed, same result on the same device."})


def size_input(default: int, what: str, minimum: int = 256, note: str = ""):
    return ("INT", {"default": default, "min": minimum, "max": MAX_SIDE, "step": SIDE_MULTIPLE,
                    "tooltip": f"Output {what} in pixels; a multiple of {SIDE_MULTIPLE}, at most {MAX_SIDE}.{note}"})


def attention_input():
    return (list(BACKENDS), {"default": "auto", "tooltip": (
        "Attention kernel. auto/sdpa: PyTorch SDPA (cuDNN or flash on CUDA); sage: SageAttention (8-bit, "
        "approximate) and flash: FlashAttention, when installed; CPU and masked calls always use SDPA.")})


def dit_speed_inputs() -> dict:
    """The decoder samplers' optional speed settings: attention kernel, regional compile, step cache."""
    return {
        "attention": attention_input(),
        "compile": ("BOOLEAN", {"default": False, "tooltip": (
            "torch.compile each DiT block (one compiled graph for all blocks); the first run compiles.")}),
        "step_cache": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
            "First-block cache: skip the other blocks when the first block's output changed less than this "
            "(relative) since the last full step. 0 = off, exact; ~0.05-0.1 trades quality for speed.")}),
    }


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"


class ModelLoader:
    """A loader node: ``checkpoint`` (release folder, single file or path) + ``dtype`` -> one model.

    Subclasses set ``FOLDER`` (the ComfyUI folder for single files), ``TOOLTIP`` and ``load_model``.
    Weights go to the offload device; sampling nodes move them to the GPU while they run.
    """
    CATEGORY = category("loaders")
    FUNCTION = "load"
    FOLDER = "text_encoders"
    TOOLTIP = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkpoint": checkpoint_input(cls.FOLDER, cls.TOOLTIP), "dtype": dtype_input()}}

    def load(self, checkpoint, dtype, **options):
        path = comfy_compat.resolve_checkpoint(checkpoint, self.FOLDER)
        return (self.load_model(path, load_dtype(dtype), comfy_compat.offload_device(), **options),)

    def load_model(self, path: str, dtype: str, device, **options):
        raise NotImplementedError
