"""Decoder sampling: token grid + glyph conditioning -> LATENT (flow matching with CFG)."""
from __future__ import annotations

from ...core.runtime import comfy_compat, handles
from ...core.runtime.attention import attention_backend, check_backend
from ...core.stages.decoder_sampling import sample_latents
from ...core.stages.latent_preview import GLM_IMAGE, decoder_preview
from ..common import category, dit_speed_inputs, seed_input


def check_token_grid(tokens: handles.TokenGrid) -> None:
    """The ids must be ``[B, H/32, W/32]``: a grid of the right count but another shape would be
    upsampled row-major into the wrong places without any error downstream."""
    want = (tokens.height // 32, tokens.width // 32)
    if tokens.ids.dim() != 3 or tuple(tokens.ids.shape[1:]) != want:
        raise ValueError(f"The token grid has ids of shape {tuple(tokens.ids.shape)} but its size "
                         f"{tokens.height}x{tokens.width} (HxW) needs [B, {want[0]}, {want[1]}] (H/32, W/32). "
                         f"Feed the tokens of an AR sampler or Image to Tokens node made for this size.")


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
                "decoder": (handles.DECODER,),
                "tokens": (handles.TOKENS,),
                "glyph": (handles.GLYPH,),
                "seed": seed_input(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 20.0, "step": 0.05,
                                       "tooltip": "Classifier-free guidance; 1.0 disables the unconditional pass."}),
            },
            "optional": {"references": (handles.REFERENCES, {"tooltip": "Reference images whose K/V the decoder reads."}),
                         **dit_speed_inputs()},
        }

    def sample(self, decoder, tokens, glyph, seed, steps, guidance, references=None, attention="auto", compile=False,
               step_cache=0.0):
        check_token_grid(tokens)
        check_backend(attention)
        preview = decoder_preview(GLM_IMAGE)  # before the decoder takes the GPU: a first use fits on the VAE
        with comfy_compat.on_compute_device(
                decoder, stage="decoder sampling", advice="lower the output size or the number of images"), \
                attention_backend(attention):
            latents = sample_latents(decoder.model, tokens.upsampled(), glyph, tokens.height, tokens.width,
                                     steps=steps, guidance=guidance, seed=seed, references=references,
                                     shift_settings=decoder.shift_settings, preview=preview,
                                     compile_blocks=compile, step_cache=step_cache)
        return ({"samples": latents.float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageDecoderSampler": GLMImageDecoderSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageDecoderSampler": "GLM-Image Decoder Sampler"}
