"""Loaders for CogView4-6B: the GLM-4-9B text encoder (with its tokenizer) and the DiT decoder."""
from __future__ import annotations

from ...core.models.cogview4_dit import load_cogview4_decoder
from ...core.models.glm_text_encoder import load_glm_text_encoder
from ...core.runtime import handles
from ...core.stages.cogview4_text import load_cogview4_tokenizer
from ..common import ModelLoader


class GLMImageCogView4TextEncoderLoader(ModelLoader):
    DESCRIPTION = ("Loads CogView4's GLM-4-9B text encoder (all layers but the last, which CogView4 does not use) "
                   "and its tokenizer. It runs once per prompt and goes back to the offload device after.")
    RETURN_TYPES = (handles.COGVIEW4_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    TOOLTIP = ("CogView4-6B release folder in models/glm_image, or a single safetensors file with tokenizer.json "
               "beside it.")

    def load_model(self, path, dtype, device):
        tokenizer = load_cogview4_tokenizer(path)
        return handles.CogView4TextEncoder(model=load_glm_text_encoder(path, dtype=dtype, device=device),
                                         tokenizer=tokenizer)


class GLMImageCogView4DecoderLoader(ModelLoader):
    DESCRIPTION = "Loads the CogView4-6B DiT (28 layers, the GLM-Image decoder's block design)."
    RETURN_TYPES = (handles.COGVIEW4_DECODER,)
    RETURN_NAMES = ("decoder",)
    FOLDER = "diffusion_models"
    TOOLTIP = "CogView4-6B release folder, or a single safetensors file in models/diffusion_models."

    def load_model(self, path, dtype, device):
        return load_cogview4_decoder(path, dtype=dtype, device=device)


NODE_CLASS_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": GLMImageCogView4TextEncoderLoader,
                       "GLMImageCogView4DecoderLoader": GLMImageCogView4DecoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": "CogView4 Text Encoder Loader (GLM-4-9B)",
                              "GLMImageCogView4DecoderLoader": "CogView4 Decoder (DiT) Loader"}
