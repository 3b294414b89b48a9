"""Decoder sampling: token grid + glyph conditioning -> LATENT (flow matching with CFG)."""
from __future__ import annotations

from ...core import comfy_compat, types
from ...core.decoder_sampling import sample_latents
from ..common import category, seed_input


class GLMImageDecoderSampler:
    DESCRIPTION = ("Runs the DiT decoder: turns a token grid (plus the glyph embeddings of the quoted text, and "
                   "reference images when editing) into a latent, 50 Euler flow-matching steps with CFG 1.5 by default.")
    CATEGORY = category("sampling")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decoder": (types.DECODER,),
                "tokens": (types.TOKENS,),
                "glyph": (types.GLYPH,),
                "seed": seed_input(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 20.0, "step": 0.05,
                                       "tooltip": "Classifier-free guidance; 1.0 disables the unconditional pass."}),
            },
            "optional": {"references": (types.REFERENCES, {"tooltip": "Reference images whose K/V the decoder reads."})},
        }

    def sample(self, decoder, tokens, glyph, seed, steps, guidance, references=None):
        with comfy_compat.on_compute_device(decoder):
            latents = sample_latents(decoder, tokens.upsampled(), glyph, tokens.height, tokens.width,
                                     steps=steps, guidance=guidance, seed=seed, references=references)
        return ({"samples": latents.float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageDecoderSampler": GLMImageDecoderSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageDecoderSampler": "GLM-Image Decoder Sampler"}
