"""Loader for a GLM-V vision-language model (captions and reranking), through transformers."""
from __future__ import annotations

from ...core import comfy_compat, types
from ...core.captioner import load_captioner
from ..common import category, dtype_input, load_dtype


class GLMImageCaptionerLoader:
    DESCRIPTION = ("Loads a GLM-V vision-language model (GLM-4.1V-9B-Thinking or GLM-4.6V-Flash release folder) "
                   "for captions and reranking. Needs transformers>=5.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.CAPTIONER,)
    RETURN_NAMES = ("captioner",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (comfy_compat.list_model_dirs("text_encoders"),
                           {"tooltip": "A GLM-V release folder inside models/text_encoders, or a path.",
                            "glm_model_file": "text_encoders"}),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = comfy_compat.resolve_checkpoint(checkpoint, "text_encoders")
        return (load_captioner(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device()),)


NODE_CLASS_MAPPINGS = {"GLMImageCaptionerLoader": GLMImageCaptionerLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCaptionerLoader": "GLM-V Captioner Loader"}
