"""2x upscale by GLM-Image re-decoding, and a CogView4 refine pass (IMAGE -> IMAGE)."""
from __future__ import annotations

import torch

from ...core.host import memory
from ...core.runtime import checks
from ...core.runtime.geometry import upscale_2x_size
from ...core.stages import handles
from ...core.stages.latent_preview import COGVIEW4, GLM_IMAGE, decoder_preview
from ...core.stages.settings import DecoderRun
from ...core.stages.upscale import check_refine_scale, check_strength, refine_cogview4, refine_size, upscale_2x
from ..common import Check, answer, category, check_now, seed_input

STRENGTH_TOOLTIP = ("Noise level (flow-matching sigma) the bicubic upsample is refined from; 1.0 decodes from pure "
                    "noise. Below the last sigma of the schedule (about 0.06 at 512 px, 0.1 at 1024 px with 30 steps) "
                    "no step is left and the result is the VAE round trip of the upsample.")


class GLMImageUpscale:
    DESCRIPTION = ("Upscales 2x by re-decoding the image's own semantic tokens at twice the size with the GLM-Image "
                   "decoder, the input as reference image. Keeps the content, not the exact pixels. Outputs up to "
                   "2048 px per side; each image of the batch is upscaled with the same seed.")
    CATEGORY = category("upscale")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": (handles.DECODER,),
            "vae": (handles.VAE,),
            "tokenizer": (handles.TOKENIZER,),
            "glyph": (handles.GLYPH, {"tooltip": "Glyph text of the image (encode \"\" when it has none)."}),
            "image": ("IMAGE",),
            "seed": seed_input(),
            "steps": ("INT", {"default": 30, "min": 1, "max": 200}),
            "guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 20.0, "step": 0.05}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip": STRENGTH_TOOLTIP}),
            "use_reference": ("BOOLEAN", {"default": True,
                                          "tooltip": "Let the decoder read the input as a reference image."}),
        }}

    CHECKS = (DecoderRun, Check(check_strength, ("strength",)))

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, guidance, strength):
        return answer(cls, locals(), *cls.CHECKS)

    def upscale(self, decoder, vae, tokenizer, glyph, image, seed, steps, guidance, strength, use_reference):
        check_now(locals(), *self.CHECKS)
        checks.check_image_batch(image, "image")
        upscale_2x_size(image.shape[1], image.shape[2])
        preview = decoder_preview(GLM_IMAGE, vae.model)
        with memory.on_compute_device(decoder, vae, tokenizer, stage="upscaling",
                                      advice="upscale a smaller image") as device:
            out = [upscale_2x(img, decoder=decoder.model, vae=vae.model, tokenizer=tokenizer.model, glyph=glyph,
                              steps=steps, guidance=guidance, seed=seed, strength=strength,
                              use_reference=use_reference, shift_settings=decoder.shift_settings, preview=preview,
                              device=device)
                   for img in image]
        return (torch.stack(out),)


class GLMImageCogView4Refine:
    DESCRIPTION = ("Refines an image with CogView4 at up to 2x its size: bicubic upsample, noise to `strength`, "
                   "then denoise the rest of the schedule with the prompt. Use CogView4's VAE. Sides 512..2048 px "
                   "after scaling.")
    CATEGORY = category("upscale")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": (handles.COGVIEW4_DECODER,),
            "vae": (handles.VAE,),
            "conditioning": (handles.COGVIEW4_CONDITIONING,),
            "image": ("IMAGE",),
            "scale": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 2.0, "step": 0.05,
                                "tooltip": "Output size over input size; rounded to multiples of 32."}),
            "seed": seed_input(),
            "steps": ("INT", {"default": 30, "min": 1, "max": 200}),
            "guidance": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 20.0, "step": 0.1}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip": STRENGTH_TOOLTIP}),
        }}

    CHECKS = (Check(check_refine_scale, ("scale",)), DecoderRun, Check(check_strength, ("strength",)))

    @classmethod
    def VALIDATE_INPUTS(cls, scale, seed, steps, guidance, strength):
        return answer(cls, locals(), *cls.CHECKS)

    def refine(self, decoder, vae, conditioning, image, scale, seed, steps, guidance, strength):
        check_now(locals(), *self.CHECKS)
        checks.check_image_batch(image, "image")
        refine_size(image.shape[1], image.shape[2], scale)
        preview = decoder_preview(COGVIEW4, vae.model)
        with memory.on_compute_device(decoder, vae, stage="refining", advice="lower the scale") as device:
            out = [refine_cogview4(img, decoder=decoder.model, vae=vae.model, cond_embeds=conditioning.cond,
                                   uncond_embeds=conditioning.uncond, scale=scale, steps=steps, guidance=guidance,
                                   seed=seed, strength=strength, shift_settings=decoder.shift_settings,
                                   preview=preview, device=device)
                   for img in image]
        return (torch.stack(out),)


NODE_CLASS_MAPPINGS = {"GLMImageUpscale": GLMImageUpscale, "GLMImageCogView4Refine": GLMImageCogView4Refine}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageUpscale": "GLM-Image Upscale 2x", "GLMImageCogView4Refine": "CogView4 Refine"}
