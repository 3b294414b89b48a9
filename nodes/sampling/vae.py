"""VAE decode (LATENT -> IMAGE) and encode (IMAGE -> LATENT)."""
from __future__ import annotations

from ...core.host import memory
from ...core.host.progress import Progress
from ...core.runtime import checks
from ...core.stages import handles
from ..common import category


class GLMImageVAEDecode:
    DESCRIPTION = "Decodes a latent to an image; in tiles when the exact decode would not fit the GPU memory."
    CATEGORY = category("vae")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (handles.VAE,), "latent": ("LATENT",),
                             "tiling": (["auto", "on", "off"], {"default": "auto",
                                        "tooltip": "auto tiles only when the exact decode would not fit the free "
                                                   "GPU memory (tiles change pixels slightly)."})}}

    def decode(self, vae, latent, tiling):
        samples = checks.check_latent(latent, "latent")
        tiled = {"auto": None, "on": True, "off": False}[tiling]
        with memory.on_compute_device(vae, stage="VAE decode", advice="set tiling to on") as device:
            return (vae.model.decode(samples, tiled=tiled, progress=Progress, device=device),)


class GLMImageVAEEncode:
    DESCRIPTION = "Encodes an image to a latent (posterior mode, normalized as the decoder expects)."
    CATEGORY = category("vae")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (handles.VAE,), "image": ("IMAGE",)}}

    def encode(self, vae, image):
        checks.check_image_batch(image, "image")
        with memory.on_compute_device(vae, stage="VAE encode", advice="encode fewer or smaller images") as device:
            return ({"samples": vae.model.encode(image, device=device).float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageVAEDecode": GLMImageVAEDecode, "GLMImageVAEEncode": GLMImageVAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageVAEDecode": "GLM-Image VAE Decode", "GLMImageVAEEncode": "GLM-Image VAE Encode"}
