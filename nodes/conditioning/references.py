"""Reference images for editing, and image -> token grid (decode existing images without the AR model)."""
from __future__ import annotations

import torch

from ...core.host import memory
from ...core.models.semantic_tokenizer import tokenize_images
from ...core.runtime import checks
from ...core.runtime.geometry import check_token_grid_size
from ...core.stages import handles
from ...core.stages.references import prepare_references, reference_sizes
from ..common import Check, answer, category, check_now, size_input


class GLMImageReferenceImages:
    DESCRIPTION = ("Prepares reference images for editing: sizes normalized (multiples of 32, aspect <= 4, inside the "
                   "pixel limits) so the AR grid and the decoder grid agree, then VAE latents and semantic tokens per "
                   "image. Every image of the batch and of the optional inputs becomes one reference.")
    CATEGORY = category("conditioning")
    RETURN_TYPES = (handles.REFERENCES, "STRING")
    RETURN_NAMES = ("references", "sizes_used")
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (handles.VAE,), "tokenizer": (handles.TOKENIZER,), "image": ("IMAGE",)},
            "optional": {"image_2": ("IMAGE",), "image_3": ("IMAGE",)},
        }

    def prepare(self, vae, tokenizer, image, image_2=None, image_3=None):
        for name, batch in (("image", image), ("image_2", image_2), ("image_3", image_3)):
            if batch is not None:
                checks.check_image_batch(batch, name)
        images = [img for batch in (image, image_2, image_3) if batch is not None for img in batch]
        reference_sizes(images)  # a reference that cannot be used is refused before the models move
        with memory.on_compute_device(vae, tokenizer, stage="reference images") as device:
            references, note = prepare_references(images, vae.model, tokenizer.model, device=device)
        return (references, note)


class GLMImageImageToTokens:
    DESCRIPTION = ("Tokenizes images with the semantic-VQ tokenizer into the token grid of an output of the given "
                   "size, so the decoder can re-render or vary an existing image without the AR model.")
    CATEGORY = category("conditioning")
    RETURN_TYPES = (handles.TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "tokenize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokenizer": (handles.TOKENIZER,), "image": ("IMAGE",),
                             "width": size_input(1024, "width"), "height": size_input(1024, "height")}}

    CHECKS = (Check(check_token_grid_size, ("height", "width")),)

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        return answer(cls, locals(), *cls.CHECKS)

    def tokenize(self, tokenizer, image, width, height):
        check_now(locals(), *self.CHECKS)
        checks.check_image_batch(image, "image")
        with memory.on_compute_device(tokenizer, stage="image to tokens") as device:
            ids = torch.stack(tokenize_images(tokenizer.model, image, target_height=height, target_width=width,
                                              device=device))
        return (handles.TokenGrid(ids=ids, height=height, width=width),)


NODE_CLASS_MAPPINGS = {"GLMImageReferenceImages": GLMImageReferenceImages,
                       "GLMImageImageToTokens": GLMImageImageToTokens}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageReferenceImages": "GLM-Image Reference Images",
                              "GLMImageImageToTokens": "GLM-Image Image to Tokens"}
