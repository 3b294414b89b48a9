"""Loaders for the GLM-Image components: AR model, semantic tokenizer, DiT decoder, Glyph-ByT5, VAE."""
from __future__ import annotations

from ...core import comfy_compat, types
from ...core.ar_prompt import load_text_tokenizer
from ...core.dit import load_decoder
from ...core.glm_ar import load_ar_model
from ...core.glyph import load_glyph_encoder
from ...core.semantic_tokenizer import load_semantic_tokenizer
from ...core.vae import load_vae
from ..common import category, checkpoint_input, dtype_input, load_dtype


def _path(checkpoint: str, single_file_folder: str) -> str:
    return comfy_compat.resolve_checkpoint(checkpoint, single_file_folder)


class GLMImageARLoader:
    DESCRIPTION = "Loads the 9B GLM autoregressive model (vision_language_encoder) and its text tokenizer."
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.AR_MODEL,)
    RETURN_NAMES = ("ar_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("text_encoders", "Release folder in models/glm_image, or a single "
                                           "safetensors file in models/text_encoders with tokenizer.json beside it."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = _path(checkpoint, "text_encoders")
        tokenizer = load_text_tokenizer(path)
        model = load_ar_model(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device())
        return (types.ARModel(model=model, tokenizer=tokenizer, path=path),)


class GLMImageTokenizerLoader:
    DESCRIPTION = ("Loads only the semantic-VQ tokenizer (vision encoder + codebook, ~1.2B parameters) out of the "
                   "AR checkpoint, never the 9B decoder.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.TOKENIZER,)
    RETURN_NAMES = ("tokenizer",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("text_encoders", "Release folder, or the AR model's single safetensors file."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = _path(checkpoint, "text_encoders")
        return (load_semantic_tokenizer(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device()),)


class GLMImageDecoderLoader:
    DESCRIPTION = "Loads the 7B DiT decoder (transformer)."
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.DECODER,)
    RETURN_NAMES = ("decoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("diffusion_models", "Release folder, or a single safetensors file in "
                                           "models/diffusion_models."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = _path(checkpoint, "diffusion_models")
        return (load_decoder(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device()),)


class GLMImageGlyphEncoderLoader:
    DESCRIPTION = "Loads the Glyph-ByT5 text encoder that embeds the quoted text of the prompt."
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.GLYPH_ENCODER,)
    RETURN_NAMES = ("glyph_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("text_encoders", "Release folder, or a single safetensors file in "
                                           "models/text_encoders."),
            "dtype": dtype_input(),
        }}

    def load(self, checkpoint, dtype):
        path = _path(checkpoint, "text_encoders")
        return (load_glyph_encoder(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device()),)


class GLMImageVAELoader:
    DESCRIPTION = ("Loads a 16-channel VAE (GLM-Image or CogView4); the latent normalization (per-channel mean/std "
                   "or scaling/shift) is read from its config.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (types.VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": checkpoint_input("vae", "Release folder, or a single safetensors file in models/vae."),
            "dtype": dtype_input(),
        }, "optional": {
            "family": (["glm_image", "cogview4"], {"default": "glm_image", "tooltip": "Latent normalization "
                       "for a single file without config.json; a release folder's config always wins."}),
        }}

    def load(self, checkpoint, dtype, family="glm_image"):
        path = _path(checkpoint, "vae")
        return (load_vae(path, dtype=load_dtype(dtype), device=comfy_compat.offload_device(), family=family),)


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
