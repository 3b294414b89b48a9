"""Glyph conditioning: the quoted text of the prompt (or an explicit list) -> Glyph-ByT5 embeddings."""
from __future__ import annotations

from ...core.runtime import comfy_compat, handles
from ...core.stages.glyph import glyph_conditioning
from ..common import category


class GLMImageGlyphConditioning:
    DESCRIPTION = ("Embeds the text to render with Glyph-ByT5: the prompt's quoted spans ('...', “...”, \"...\", "
                   "「...」), or the texts given one per line.")
    CATEGORY = category("conditioning")
    RETURN_TYPES = (handles.GLYPH,)
    RETURN_NAMES = ("glyph",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "glyph_encoder": (handles.GLYPH_ENCODER,),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The same prompt as the AR sampler's; only quoted text is used."}),
            },
            "optional": {"texts": ("STRING", {"multiline": True, "default": "",
                                              "tooltip": "Texts to render, one per line; overrides the quotes."})},
        }

    def encode(self, glyph_encoder, prompt, texts=""):
        explicit = [line.strip() for line in texts.splitlines() if line.strip()] or None
        with comfy_compat.on_compute_device(glyph_encoder, stage="glyph conditioning"):
            return (glyph_conditioning(glyph_encoder.model, prompt, texts=explicit),)


NODE_CLASS_MAPPINGS = {"GLMImageGlyphConditioning": GLMImageGlyphConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageGlyphConditioning": "GLM-Image Glyph Conditioning"}
