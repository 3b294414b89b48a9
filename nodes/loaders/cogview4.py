"""Loaders for CogView4-6B: the GLM-4-9B text encoder (with its tokenizer) and the DiT decoder."""
from __future__ import annotations

from ...core.models import cogview4_dit, glm_text_encoder
from ...core.stages import handles
from ...core.stages.cogview4_text import load_cogview4_tokenizer
from ...core.stages.flow_schedule import release_shift_settings
from ..common import ModelLoader


class GLMImageCogView4TextEncoderLoader(ModelLoader):
    DESCRIPTION = ("Loads CogView4's GLM-4-9B text encoder (all layers but the last, which CogView4 does not use) "
                   "and its tokenizer, from the release, a single safetensors file, or an FP8 / GGUF file made by "
                   "convert.py.")
    RETURN_TYPES = (handles.COGVIEW4_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    SPEC = glm_text_encoder.SPEC
    TOOLTIP = ("CogView4-6B release folder in models/glm_image, or a single .safetensors / .gguf file in "
               "models/text_encoders with tokenizer.json beside it.")

    def load_model(self, path, dtype, device, compute_device=None):
        tokenizer = load_cogview4_tokenizer(path)
        return handles.CogView4TextEncoder(glm_text_encoder.load_glm_text_encoder(path, dtype=dtype, device=device,
                                                                                  compute_device=compute_device),
                                           tokenizer=tokenizer)


class GLMImageCogView4DecoderLoader(ModelLoader):
    DESCRIPTION = ("Loads the CogView4-6B DiT (28 layers, the GLM-Image decoder's block design) from the release, a "
                   "single safetensors file, or an FP8 / GGUF file made by convert.py.")
    RETURN_TYPES = (handles.COGVIEW4_DECODER,)
    RETURN_NAMES = ("decoder",)
    FOLDER = "diffusion_models"
    SPEC = cogview4_dit.SPEC
    TOOLTIP = ("CogView4-6B release folder, or a single .safetensors / .gguf file in models/diffusion_models (or "
               "models/unet).")

    def load_model(self, path, dtype, device, compute_device=None):
        return handles.Decoder(cogview4_dit.load_cogview4_decoder(path, dtype=dtype, device=device,
                                                                  compute_device=compute_device),
                               shift_settings=release_shift_settings(path))


NODE_CLASS_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": GLMImageCogView4TextEncoderLoader,
                       "GLMImageCogView4DecoderLoader": GLMImageCogView4DecoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogView4TextEncoderLoader": "CogView4 Text Encoder Loader (GLM-4-9B)",
                              "GLMImageCogView4DecoderLoader": "CogView4 Decoder (DiT) Loader"}
