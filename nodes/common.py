"""Shared bits of the node layer: categories, widget definitions, model-file choices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.host import folders
from ..core.loading.residency import resolve_blocks
from ..core.runtime import checks, devices
from ..core.runtime.attention import BACKENDS
from ..core.runtime.geometry import MAX_SIDE, SIDE_MULTIPLE
from ..core.stages import handles
from ..core.stages.settings import from_widgets

CATEGORY = "GLM-Image"
MAX_SEED = checks.MAX_SEED
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
    files = folders.list_single_files(single_file_folder)
    if gguf:
        files += folders.list_gguf_files(single_file_folder)
    return folders.list_release_folders() + files


def checkpoint_input(single_file_folder: str, tooltip: str, gguf: bool = False):
    choices = checkpoint_choices(single_file_folder, gguf)
    # Marks a combo whose values are model files: the workflow validation test accepts any string there.
    return (choices, {"tooltip": tooltip, "glm_model_file": single_file_folder})


def dtype_input(choices: list[str] | None = None):
    choices = choices or ["auto", "bf16", "fp32", "fp16"]
    tooltip = DTYPE_TOOLTIP + (FP8_TOOLTIP if "fp8_e4m3fn" in choices else "")
    return (choices, {"default": "auto", "tooltip": tooltip})


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


def preview_vae_input():
    return (handles.VAE, {"tooltip": (
        "The VAE whose colours the live previews use. Not connected: the VAE of the decoder's own release "
        "(vae/ beside it); a decoder file outside a release shows no preview without this input.")})


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


@dataclass(frozen=True)
class Check:
    """A core check and the node inputs it reads, named here (not found by reflection): called with them as
    keywords once every one of ``inputs`` is given (``optional`` ones go along when given). A core parameter
    renamed without this list fails with a TypeError in the tests, instead of the check silently switching off."""
    function: Callable
    inputs: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def __call__(self, given: dict) -> None:
        if all(name in given for name in self.inputs):
            self.function(**{name: given[name] for name in self.inputs + self.optional if name in given})

    @property
    def names(self) -> tuple[str, ...]:
        return self.inputs + self.optional


def run_check(check, given: dict):
    """One entry of a node's ``CHECKS``: a ``Check``, or a settings dataclass built from the widgets by field
    name (its ``__post_init__`` holds the rules). Returns the settings object (None for a ``Check``)."""
    if isinstance(check, Check):
        return check(given)
    return from_widgets(check, given)


def answer(cls, values: dict, *core_checks) -> bool | str:
    """What a node's ``VALIDATE_INPUTS`` returns: True, or the message of the first failing check.

    ``values``: the inputs VALIDATE_INPUTS takes. An input that arrives through a link is None here and is
    checked when the node runs. ComfyUI skips its own min/max checks for these inputs, so after the core
    checks their widget ranges are checked too.
    ``core_checks``: ``Check`` rules and settings dataclasses (see ``run_check``), with the messages the core
    gives at run time.
    """
    given = _given(values)
    try:
        for check in core_checks:
            run_check(check, given)
        check_widget_values(cls, given)
    except ValueError as e:
        return str(e)
    return True


def check_now(values: dict, *core_checks) -> dict:
    """The core checks of ``answer``, run by the node itself before it moves any model: the in-process executor
    and scripts call nodes without ComfyUI's validation (the widget ranges are the UI's; the core's bounds
    are the core checks'). Returns the settings objects built, by class."""
    given = _given(values)
    built = {check: run_check(check, given) for check in core_checks}
    return {cls: obj for cls, obj in built.items() if obj is not None}


def _given(values: dict) -> dict:
    return {name: value for name, value in values.items() if name not in ("cls", "self") and value is not None}


def check_widget_values(cls, values: dict) -> None:
    """Numbers finite and inside their widget's min..max, text valid (what ComfyUI checks before a node with
    VALIDATE_INPUTS runs, and the in-process executor for every node)."""
    types = cls.INPUT_TYPES()
    specs = {**types.get("required", {}), **types.get("optional", {})}
    for name, value in values.items():
        if name in specs:
            check_widget_value(name, specs[name], value)


def check_widget_value(name: str, spec: tuple, value) -> None:
    """One widget value against its ``INPUT_TYPES`` entry; sockets (non-widget types) are not checked."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        if options.get("glm_model_file") or options.get("image_upload"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must name a file, got {value!r}.")
        elif value not in kind:
            raise ValueError(f"{name} = {value!r} is not one of {kind}.")
    elif kind == "INT":
        checks.check_int(value, name, options.get("min"), options.get("max"))
    elif kind == "FLOAT":
        checks.check_float(value, name, options.get("min"), options.get("max"))
    elif kind == "STRING":
        checks.check_text(value, name)
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")


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
        path = folders.resolve_checkpoint(checkpoint, self.FOLDER)
        # weights on the offload device, ``auto`` resolved for the compute device (the sampling nodes move them)
        handle = self.load_model(path, dtype, devices.offload_device(), compute_device=devices.get_device(),
                                 **options)
        handle.path = path
        if self.SPEC is not None:
            handle.blocks = self.SPEC.blocks
        if block_swap:
            resolve_blocks(handle.module, handle.blocks, block_swap)  # a count the model cannot serve fails here
            handle.block_swap = block_swap
        return (handle,)

    def load_model(self, path: str, dtype: str, device, compute_device=None, **options):
        raise NotImplementedError
