"""The CogView (v1) VQ-VAE: 8192 codes, 8x downsampling; IMAGE <-> token grid."""
from __future__ import annotations

from ...core.host import memory
from ...core.runtime import checks
from ...core.stages import handles
from ..common import category


class GLMImageCogViewVQEncode:
    DESCRIPTION = ("Encodes images to 8192-code token grids (1/8 of the size; sides must be multiples of 8) with the "
                   "release's input normalization.")
    CATEGORY = category("cogview")
    RETURN_TYPES = (handles.COGVIEW_VQ_TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vqvae": (handles.COGVIEW_VQVAE,), "image": ("IMAGE",)}}

    def encode(self, vqvae, image):
        checks.check_image_batch(image, "image")
        with memory.on_compute_device(vqvae) as device:
            return (vqvae.model.encode(image, device=device),)


class GLMImageCogViewVQDecode:
    DESCRIPTION = "Decodes 8192-code token grids to images (clamped to 0..1)."
    CATEGORY = category("cogview")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vqvae": (handles.COGVIEW_VQVAE,), "tokens": (handles.COGVIEW_VQ_TOKENS,)}}

    def decode(self, vqvae, tokens):
        checks.check_token_ids(tokens, "tokens", vqvae.model.n_embed)
        with memory.on_compute_device(vqvae) as device:
            return (vqvae.model.decode(tokens, device=device),)


NODE_CLASS_MAPPINGS = {"GLMImageCogViewVQEncode": GLMImageCogViewVQEncode,
                       "GLMImageCogViewVQDecode": GLMImageCogViewVQDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogViewVQEncode": "CogView VQ Encode (8192 codes)",
                              "GLMImageCogViewVQDecode": "CogView VQ Decode"}
