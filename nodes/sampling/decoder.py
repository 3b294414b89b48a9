"""Decoder sampling: token grid + glyph conditioning -> LATENT (flow matching with CFG)."""
from __future__ import annotations

from dataclasses import replace

from ...core.runtime.geometry import check_token_grid_shape
from ...core.stages import handles
from ...core.stages.decoder_sampling import sample_latents
from ...core.stages.glyph import check_glyph_width
from ...core.stages.latent_preview import GLM_IMAGE, decoder_preview
from ...core.stages.settings import DecoderRun
from ..common import dit_speed_inputs, preview_vae_input, seed_input
from ..sampler_node import SamplerNode


class GLMImageDecoderSampler(SamplerNode):
    DESCRIPTION = ("Runs the DiT decoder: turns a token grid (plus the glyph embeddings of the quoted text, and "
                   "reference images when editing) into a latent, 50 Euler flow-matching steps with CFG 1.5 by "
                   "default.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    CHECKS = (DecoderRun,)
    STAGE = "decoder sampling"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decoder": (handles.DECODER,),
                "tokens": (handles.TOKENS,),
                "glyph": (handles.GLYPH,),
                "seed": seed_input(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 20.0, "step": 0.05,
                                       "tooltip": "Classifier-free guidance; 1.0 disables the unconditional pass."}),
            },
            "optional": {"references": (handles.REFERENCES,
                                        {"tooltip": "Reference images whose K/V the decoder reads."}),
                         **dit_speed_inputs(), "vae": preview_vae_input()},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, guidance):
        return cls.answer(locals())

    def sample(self, decoder, tokens, glyph, seed, steps, guidance, references=None, attention="auto", compile=False,
               step_cache=0.0, vae=None):
        run = self.checked(locals())
        check_token_grid_shape(tuple(tokens.ids.shape), tokens.height, tokens.width)
        check_glyph_width(glyph, decoder.model.config.text_embed_dim)
        settings = replace(run[DecoderRun], shift_settings=decoder.shift_settings)
        # before the decoder takes the GPU: a first use fits on the VAE
        preview = decoder_preview(GLM_IMAGE, vae.model if vae is not None else None, release=decoder.path)
        with self.on_device(decoder) as device:
            latents = sample_latents(decoder.model, tokens.upsampled(), glyph, tokens.height, tokens.width, settings,
                                     references=references, preview=preview, options=run.options, device=device)
        return ({"samples": latents.float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageDecoderSampler": GLMImageDecoderSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageDecoderSampler": "GLM-Image Decoder Sampler"}
