"""Decoder sampling: token grid + glyph conditioning -> LATENT (flow matching with CFG)."""
from __future__ import annotations

from ...core.host import memory
from ...core.runtime.attention import attention_backend, check_backend
from ...core.runtime.geometry import check_token_grid_shape
from ...core.stages import handles
from ...core.stages.decoder_sampling import check_sampler_settings, sample_latents
from ...core.stages.glyph import check_glyph_width
from ...core.stages.latent_preview import GLM_IMAGE, decoder_preview
from ..common import answer, category, check_now, dit_speed_inputs, seed_input


class GLMImageDecoderSampler:
    DESCRIPTION = ("Runs the DiT decoder: turns a token grid (plus the glyph embeddings of the quoted text, and "
                   "reference images when editing) into a latent, 50 Euler flow-matching steps with CFG 1.5 by "
                   "default.")
    CATEGORY = category("sampling")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

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
                         **dit_speed_inputs()},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, guidance):
        return answer(cls, locals(), check_sampler_settings)

    def sample(self, decoder, tokens, glyph, seed, steps, guidance, references=None, attention="auto", compile=False,
               step_cache=0.0):
        check_now(locals(), check_sampler_settings)
        check_token_grid_shape(tuple(tokens.ids.shape), tokens.height, tokens.width)
        check_backend(attention)
        check_glyph_width(glyph, decoder.model.config.text_embed_dim)
        preview = decoder_preview(GLM_IMAGE)  # before the decoder takes the GPU: a first use fits on the VAE
        with memory.on_compute_device(
                decoder, stage="decoder sampling", advice="lower the output size or the number of images"), \
                attention_backend(attention):
            latents = sample_latents(decoder.model, tokens.upsampled(), glyph, tokens.height, tokens.width,
                                     steps=steps, guidance=guidance, seed=seed, references=references,
                                     shift_settings=decoder.shift_settings, preview=preview,
                                     compile_blocks=compile, step_cache=step_cache)
        return ({"samples": latents.float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageDecoderSampler": GLMImageDecoderSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageDecoderSampler": "GLM-Image Decoder Sampler"}
