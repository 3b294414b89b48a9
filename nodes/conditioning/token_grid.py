"""Token Grid Preview: a token grid (GLMIMAGE_TOKENS) as an IMAGE, to see what the AR wrote."""
from __future__ import annotations

from ...core.stages import handles
from ...core.stages.token_preview import palette, token_grid_images
from ..common import category


class GLMImageTokenGridPreview:
    DESCRIPTION = ("Draws a token grid as an image at its output size, one block per token. With the AR model or "
                   "the semantic tokenizer connected, similar codes get similar colours (the first three principal "
                   "components of the code vectors), the colours of the AR sampler's live preview; without, a fixed "
                   "colour per id.")
    CATEGORY = category("conditioning")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": (handles.TOKENS,),
                "grid": (["tokens", "preview"], {
                    "default": "tokens",
                    "tooltip": "tokens: the grid the decoder reads (1/32 of the size); preview: the small grid the "
                               "AR writes first in text to image."}),
            },
            "optional": {
                "ar_model": (handles.AR_MODEL, {"tooltip": "Colours from the AR model's code embeddings."}),
                "tokenizer": (handles.TOKENIZER, {"tooltip": "Colours from the tokenizer's codebook."}),
            },
        }

    def draw(self, tokens, grid, ar_model=None, tokenizer=None):
        if ar_model is not None:
            colours = palette(ar_model=ar_model.model, codebook_size=ar_model.vocabulary.codebook_size)
        else:
            colours = palette(tokenizer=tokenizer.model if tokenizer is not None else None)
        return (token_grid_images(tokens, colours, grid),)


NODE_CLASS_MAPPINGS = {"GLMImageTokenGridPreview": GLMImageTokenGridPreview}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageTokenGridPreview": "GLM-Image Token Grid Preview"}
