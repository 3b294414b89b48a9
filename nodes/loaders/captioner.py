"""Loader for a GLM-V vision-language model (captions and reranking), through transformers."""
from __future__ import annotations

from ...core.host import folders
from ...core.models.captioner import load_captioner
from ...core.stages import handles
from ..common import ModelLoader, dtype_input


class GLMImageCaptionerLoader(ModelLoader):
    DESCRIPTION = ("Loads a GLM-V vision-language model (GLM-4.1V-9B-Thinking or GLM-4.6V-Flash release folder) "
                   "for captions and reranking. Needs transformers>=5.")
    RETURN_TYPES = (handles.CAPTIONER,)
    RETURN_NAMES = ("captioner",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (folders.list_model_dirs("text_encoders"),
                           {"tooltip": "A GLM-V release folder inside models/text_encoders, or a path.",
                            "glm_model_file": "text_encoders"}),
            "dtype": dtype_input(),
        }}

    def load_model(self, path, dtype, device, compute_device=None):
        return handles.ModelHandle(load_captioner(path, dtype=dtype, device=device, compute_device=compute_device))


NODE_CLASS_MAPPINGS = {"GLMImageCaptionerLoader": GLMImageCaptionerLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCaptionerLoader": "GLM-V Captioner Loader"}
