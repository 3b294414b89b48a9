"""LoRA loaders: a model + a LoRA file + a strength -> the same model with the LoRA, ComfyUI's way: the loaded
model is shared and never changed; the node returns a new handle that carries its LoRAs (they stack), applied
only while a sampler runs it. A branch of the graph without the LoRA gets exactly the base model."""
from __future__ import annotations

from ...core.formats import lora_targets
from ...core.host import folders
from ...core.loading.lora_patches import with_lora
from ...core.runtime import checks
from ...core.stages import handles
from ..common import category

LORA_TOOLTIP = ("A LoRA in models/loras: a PEFT adapter (its adapter_model.safetensors, with adapter_config.json "
                "beside it), a diffusers pytorch_lora_weights.safetensors, or a kohya / ai-toolkit .safetensors. "
                "Outside ComfyUI, a path.")
STRENGTH_TOOLTIP = ("How much of the LoRA's change to apply: 1 as trained, 0 none (the model passes through), "
                    "above 1 more, negative the opposite way. LoRA nodes chain; each adds its own LoRA.")


class LoraLoader:
    """``MODEL_INPUT`` (a ``SOCKET`` handle) + ``lora_name`` + ``strength`` -> the handle with the LoRA."""
    CATEGORY = category("loaders")
    FUNCTION = "load"
    MODEL_INPUT = ""
    SOCKET = ""
    TARGET: lora_targets.LoraTarget

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.RETURN_TYPES, cls.RETURN_NAMES = (cls.SOCKET,), (cls.MODEL_INPUT,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            cls.MODEL_INPUT: (cls.SOCKET,),
            # the glm_model_file marker: the workflow validation test accepts any file name here
            "lora_name": (folders.list_lora_files(), {"tooltip": LORA_TOOLTIP, "glm_model_file": "loras"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                   "tooltip": STRENGTH_TOOLTIP}),
        }}

    def load(self, lora_name, strength, **model):
        handle = model[self.MODEL_INPUT]
        strength = checks.check_float(strength, "strength", fix="1 applies the LoRA as trained, 0 not at all.")
        if strength == 0:  # as core's LoraLoader: nothing to apply, the same model
            return (handle,)
        lora = lora_targets.load_lora(folders.resolve_lora(lora_name), self.TARGET, handle.module)
        return (with_lora(handle, lora, strength),)


class GLMImageARLoraLoader(LoraLoader):
    DESCRIPTION = ("Applies a LoRA to the GLM-Image AR model (PEFT adapters of GlmImageForConditionalGeneration, "
                   "e.g. rank-32 adapters on the attention projections).")
    MODEL_INPUT = "ar_model"
    SOCKET = handles.AR_MODEL
    TARGET = lora_targets.AR


class GLMImageDecoderLoraLoader(LoraLoader):
    DESCRIPTION = "Applies a LoRA to the GLM-Image DiT decoder (diffusers, PEFT or kohya keys)."
    MODEL_INPUT = "decoder"
    SOCKET = handles.DECODER
    TARGET = lora_targets.GLM_IMAGE_DIT


class GLMImageCogView4LoraLoader(LoraLoader):
    DESCRIPTION = ("Applies a LoRA to the CogView4-6B DiT (what CogView4Pipeline.load_lora_weights reads, kohya "
                   "or ai-toolkit files).")
    MODEL_INPUT = "decoder"
    SOCKET = handles.COGVIEW4_DECODER
    TARGET = lora_targets.COGVIEW4_DIT


NODE_CLASS_MAPPINGS = {"GLMImageARLoraLoader": GLMImageARLoraLoader,
                       "GLMImageDecoderLoraLoader": GLMImageDecoderLoraLoader,
                       "GLMImageCogView4LoraLoader": GLMImageCogView4LoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageARLoraLoader": lora_targets.AR.node,
                              "GLMImageDecoderLoraLoader": lora_targets.GLM_IMAGE_DIT.node,
                              "GLMImageCogView4LoraLoader": lora_targets.COGVIEW4_DIT.node}
