"""Loaders for the GLM-Image components: AR model, semantic tokenizer, DiT decoder, Glyph-ByT5, VAE."""
from __future__ import annotations

from ...core.models import glm_ar, glm_image_dit, semantic_tokenizer, t5_encoder, vae
from ...core.stages import handles
from ...core.stages.ar_prompt import load_text_tokenizer
from ...core.stages.flow_schedule import release_shift_settings
from ..common import ModelLoader


class GLMImageARLoader(ModelLoader):
    DESCRIPTION = ("Loads the 9B GLM autoregressive model (vision_language_encoder) and its text tokenizer, from the "
                   "release, a single safetensors file, or an FP8 / GGUF file made by convert.py.")
    RETURN_TYPES = (handles.AR_MODEL,)
    RETURN_NAMES = ("ar_model",)
    SPEC = glm_ar.SPEC
    TOOLTIP = ("Release folder in models/glm_image, or a single .safetensors / .gguf file in models/text_encoders "
               "with the release's processor/tokenizer.json beside it.")

    def load_model(self, path, dtype, device, compute_device=None):
        tokenizer = load_text_tokenizer(path)
        return handles.ARModel(model=glm_ar.load_ar_model(path, dtype=dtype, device=device,
                                                          compute_device=compute_device), tokenizer=tokenizer)


class GLMImageTokenizerLoader(ModelLoader):
    DESCRIPTION = ("Loads only the semantic-VQ tokenizer (vision encoder + codebook, ~1.2B parameters) out of the "
                   "AR checkpoint, never the 9B decoder.")
    RETURN_TYPES = (handles.TOKENIZER,)
    RETURN_NAMES = ("tokenizer",)
    SPEC = semantic_tokenizer.SPEC
    TOOLTIP = "Release folder, or the AR model's original single safetensors file."

    def load_model(self, path, dtype, device, compute_device=None):
        return handles.ModelHandle(semantic_tokenizer.load_semantic_tokenizer(path, dtype=dtype, device=device,
                                                                              compute_device=compute_device))


class GLMImageDecoderLoader(ModelLoader):
    DESCRIPTION = ("Loads the 7B DiT decoder (transformer) from the release, a single safetensors file, or an FP8 / "
                   "GGUF file made by convert.py.")
    RETURN_TYPES = (handles.DECODER,)
    RETURN_NAMES = ("decoder",)
    FOLDER = "diffusion_models"
    SPEC = glm_image_dit.SPEC
    TOOLTIP = "Release folder, or a single .safetensors / .gguf file in models/diffusion_models (or models/unet)."

    def load_model(self, path, dtype, device, compute_device=None):
        return handles.Decoder(glm_image_dit.load_decoder(path, dtype=dtype, device=device,
                                                          compute_device=compute_device),
                               shift_settings=release_shift_settings(path))


class GLMImageGlyphEncoderLoader(ModelLoader):
    DESCRIPTION = "Loads the Glyph-ByT5 text encoder that embeds the quoted text of the prompt."
    RETURN_TYPES = (handles.GLYPH_ENCODER,)
    RETURN_NAMES = ("glyph_encoder",)
    SPEC = t5_encoder.SPEC
    TOOLTIP = "Release folder, or a single .safetensors / .gguf file in models/text_encoders."

    def load_model(self, path, dtype, device, compute_device=None):
        return handles.ModelHandle(t5_encoder.load_glyph_encoder(path, dtype=dtype, device=device,
                                                                 compute_device=compute_device))


class GLMImageVAELoader(ModelLoader):
    DESCRIPTION = ("Loads a 16-channel VAE (GLM-Image or CogView4); the latent normalization (per-channel mean/std "
                   "or scaling/shift) is read from its config.")
    RETURN_TYPES = (handles.VAE,)
    RETURN_NAMES = ("vae",)
    FOLDER = "vae"
    SPEC = vae.SPEC
    TOOLTIP = "Release folder, or a single safetensors file in models/vae."

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        inputs["optional"] = {"family": (["glm_image", "cogview4"], {
            "default": "glm_image",
            "tooltip": "Latent normalization for a single file without config.json; a release folder's config wins."})}
        return inputs

    def load_model(self, path, dtype, device, family="glm_image", compute_device=None):
        return handles.ModelHandle(vae.load_vae(path, dtype=dtype, device=device, family=family,
                                                compute_device=compute_device))


NODE_CLASS_MAPPINGS = {
    "GLMImageARLoader": GLMImageARLoader,
    "GLMImageTokenizerLoader": GLMImageTokenizerLoader,
    "GLMImageDecoderLoader": GLMImageDecoderLoader,
    "GLMImageGlyphEncoderLoader": GLMImageGlyphEncoderLoader,
    "GLMImageVAELoader": GLMImageVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GLMImageARLoader": "GLM-Image AR Model Loader",
    "GLMImageTokenizerLoader": "GLM-Image Semantic Tokenizer Loader",
    "GLMImageDecoderLoader": "GLM-Image Decoder (DiT) Loader",
    "GLMImageGlyphEncoderLoader": "GLM-Image Glyph-ByT5 Loader",
    "GLMImageVAELoader": "GLM-Image VAE Loader",
}
