"""Shared bits of the node layer: categories, widget definitions, model-file choices."""
from __future__ import annotations

import torch

from ..core.runtime import comfy_compat
from ..core.runtime.attention import BACKENDS
from ..core.runtime.geometry import MAX_SIDE, SIDE_MULTIPLE
from ..core.runtime.loading import resolve_dtype
from ..core.runtime.residency import resolve_blocks

CATEGORY = "GLM-Image"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
DTYPE_TOOLTIP = "Weight dtype. auto: bf16 on GPUs that support it, else fp32."
FP8_TOOLTIP = (" fp8_e4m3fn: the transformer weights quantized to FP8 while loading (half the memory of bf16). For "
               "FP8 and GGUF files: the dtype they are dequantized to per layer.")
BLOCK_SWAP_TOOLTIP = ("Outside ComfyUI: keep this many transformer blocks on the offload device (CPU) and copy each "
                      "in just before it runs, for GPUs too small for the whole model. Inside ComfyUI its memory "
                      "manager does this by itself (partial loading) and this is not used.")


def checkpoint_choices(single_file_folder: str, gguf: bool = False) -> list[str]:
    """Release folders of ``models/glm_image`` plus single files of ``models/<single_file_folder>`` (and its
    ``.gguf`` files when the loader reads GGUF).

    Outside ComfyUI nothing is listed; the loaders also accept a path.
    """
    files = comfy_compat.list_single_files(single_file_folder)
    if gguf:
        files += comfy_compat.list_gguf_files(single_file_folder)
    return comfy_compat.list_release_folders() + files


def checkpoint_input(single_file_folder: str, tooltip: str, gguf: bool = False):
    choices = checkpoint_choices(single_file_folder, gguf)
    # Marks a combo whose values are model files: the workflow validation test accepts any string there.
    return (choices, {"tooltip": tooltip, "glm_model_file": single_file_folder})


def dtype_input(choices: list[str] | None = None):
    choices = choices or ["auto", "bf16", "fp32", "fp16"]
    tooltip = DTYPE_TOOLTIP + (FP8_TOOLTIP if "fp8_e4m3fn" in choices else "")
    return (choices, {"default": "auto", "tooltip": tooltip})


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
    """A loader node: ``checkpoint`` (release folder, single file or path) + ``dtype`` -> one model handle.

    Subclasses set ``SPEC`` (the component: its dtype choices, whether it reads FP8/GGUF, its blocks), ``FOLDER``
    (the ComfyUI folder for single files), ``TOOLTIP`` and ``load_model`` (returning a ``handles.ModelHandle``).
    Weights go to the offload device; sampling nodes put them on the GPU (through ComfyUI's memory manager
    inside ComfyUI).
    """
    CATEGORY = category("loaders")
    FUNCTION = "load"
    FOLDER = "text_encoders"
    TOOLTIP = ""
    SPEC = None

    @classmethod
    def INPUT_TYPES(cls):
        formats = cls.SPEC is not None and cls.SPEC.quantize is not None
        inputs = {"required": {"checkpoint": checkpoint_input(cls.FOLDER, cls.TOOLTIP, gguf=formats),
                               "dtype": dtype_input(cls.SPEC.dtypes if cls.SPEC is not None else None)}}
        if cls.SPEC is not None and cls.SPEC.blocks is not None:
            inputs["optional"] = {"block_swap": ("INT", {"default": 0, "min": 0, "max": 64,
                                                         "tooltip": BLOCK_SWAP_TOOLTIP})}
        return inputs

    def load(self, checkpoint, dtype, block_swap=0, **options):
        path = comfy_compat.resolve_checkpoint(checkpoint, self.FOLDER)
        handle = self.load_model(path, load_dtype(dtype), comfy_compat.offload_device(), **options)
        handle.path = path
        if self.SPEC is not None:
            handle.blocks = self.SPEC.blocks
        if block_swap:
            resolve_blocks(handle.module, handle.blocks, block_swap)  # a count the model cannot serve fails here
            handle.block_swap = block_swap
        return (handle,)

    def load_model(self, path: str, dtype: str, device, **options):
        raise NotImplementedError
