"""Glyph conditioning: the quoted text of the prompt (or an explicit list) -> Glyph-ByT5 embeddings."""
from __future__ import annotations

from ...core.host import memory
from ...core.stages import handles
from ...core.stages.glyph import glyph_conditioning, glyph_texts
from ..common import Check, answer, category, check_now


def texts_to_render(texts: str) -> list[str] | None:
    """The ``texts`` widget: one text per non-empty line, or None (the prompt's quotes)."""
    return [line.strip() for line in texts.splitlines() if line.strip()] or None


def check_glyph_inputs(prompt: str, texts: str = "") -> None:
    for name, value in (("prompt", prompt), ("texts", texts)):
        if not isinstance(value, str):  # the rest (length, Unicode) per glyph text, with its number
            raise ValueError(f"{name} must be text, got {type(value).__name__}. Connect a STRING or type the text.")
    glyph_texts(prompt, texts_to_render(texts))


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
                                      "tooltip": ("The AR sampler's prompt: connect its prompt output here. Only "
                                                  "quoted text is used.")}),
            },
            "optional": {"texts": ("STRING", {"multiline": True, "default": "",
                                              "tooltip": "Texts to render, one per line; overrides the quotes."})},
        }

    CHECKS = (Check(check_glyph_inputs, ("prompt",), optional=("texts",)),)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, texts=None):
        return answer(cls, locals(), *cls.CHECKS)

    def encode(self, glyph_encoder, prompt, texts=""):
        check_now(locals(), *self.CHECKS)
        with memory.on_compute_device(glyph_encoder, stage="glyph conditioning") as device:
            return (glyph_conditioning(glyph_encoder.model, prompt, texts=texts_to_render(texts), device=device),)


NODE_CLASS_MAPPINGS = {"GLMImageGlyphConditioning": GLMImageGlyphConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageGlyphConditioning": "GLM-Image Glyph Conditioning"}
