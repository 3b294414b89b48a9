"""Loaders for CogView4-6B: the GLM-4-9B text encoder (with its tokenizer) and the DiT decoder."""
from __future__ import annotations

from ...core import comfy_compat, types
from ...core.cogview4_dit import load_cogview4_decoder
from ...core.cogview4_text import load_cogview4_tokenizer
from ...core.glm_text_encoder import load_glm_text_encoder
from ..common import category, checkpoint_input, dtype_input, load_dtype


class GLMImageCogView4TextEncoderLoader:
    DESCRIPTION = ("Loads CogView4's GLM-4-9B text encoder (all layers but the last, which CogView4 does not use) "
                   "and its tokenizer. It runs once per prompt; free it before sampling on small cards.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.COGVIEW4_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("text_encoders", "CogView4-6B release folder in models/glm_image, or a "
                                           "single safetensors file with tokenizer.json beside it."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = comfy_compat.resolve_checkpoint(checkpoint, "text_encoders")
        tokenizer = load_cogview4_tokenizer(path)
        model = load_glm_text_encoder(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device())
        return (types.CogView4TextEncoder(model=model, tokenizer=tokenizer),)


class GLMImageCogView4DecoderLoader:
    DESCRIPTION = "Loads the CogView4-6B DiT (28 layers, the GLM-Image decoder's block design)."
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.COGVIEW4_DECODER,)
    RETURN_NAMES = ("decoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("diffusion_models", "CogView4-6B release folder, or a single safetensors "
                                           "file in models/diffusion_models."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = comfy_compat.resolve_checkpoint(checkpoint, "diffusion_models")
        return (load_cogview4_decoder(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device()),)


NODE_CLASS_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": GLMImageCogView4TextEncoderLoader,
                       "GLMImageCogView4DecoderLoader": GLMImageCogView4DecoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": "CogView4 Text Encoder Loader (GLM-4-9B)",
                              "GLMImageCogView4DecoderLoader": "CogView4 Decoder (DiT) Loader"}
