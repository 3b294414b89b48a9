"""CogView4-6B: prompt encoding (positive and negative) and decoder sampling to LATENT."""
from __future__ import annotations

from dataclasses import replace

from ...core.host import memory
from ...core.runtime import checks
from ...core.runtime.geometry import check_cogview4_size
from ...core.stages import handles
from ...core.stages.cogview4_text import encode_cogview4_prompt
from ...core.stages.decoder_sampling import sample_cogview4_latents
from ...core.stages.latent_preview import COGVIEW4, decoder_preview
from ...core.stages.settings import DecoderRun
from ..common import Check, answer, category, check_now, dit_speed_inputs, preview_vae_input, seed_input, size_input
from ..sampler_node import SamplerNode


def check_negative_prompt(negative_prompt: str) -> str:
    return checks.check_text(negative_prompt, "negative_prompt")


class GLMImageCogView4TextEncode:
    DESCRIPTION = ("Encodes the prompt and the negative prompt with GLM-4-9B (the second-to-last hidden state, as "
                   "CogView4 does). Prompts over 1024 tokens are truncated with a warning.")
    CATEGORY = category("conditioning")
    RETURN_TYPES = (handles.COGVIEW4_CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (handles.COGVIEW4_TEXT_ENCODER,),
            "prompt": ("STRING", {"multiline": True, "default": ""}),
            "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
        }}

    CHECKS = (Check(checks.check_prompt, ("prompt",)), Check(check_negative_prompt, ("negative_prompt",)))

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, negative_prompt):
        return answer(cls, locals(), *cls.CHECKS)

    def encode(self, text_encoder, prompt, negative_prompt):
        check_now(locals(), *self.CHECKS)
        with memory.on_compute_device(text_encoder, stage="CogView4 text encoding",
                                      advice="shorten the prompt") as device:
            cond = encode_cogview4_prompt(text_encoder.model, text_encoder.tokenizer, prompt, device=device).cpu()
            uncond = encode_cogview4_prompt(text_encoder.model, text_encoder.tokenizer, negative_prompt,
                                            name="negative_prompt", device=device).cpu()
        return (handles.CogView4Conditioning(cond=cond, uncond=uncond, prompt=prompt),)


class GLMImageCogView4Sampler(SamplerNode):
    DESCRIPTION = ("CogView4-6B text to image: flow matching with CFG (guidance 5.0). Decode the latent with the "
                   "GLM-Image VAE Decode node and CogView4's VAE.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    STAGE = "CogView4 sampling"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": (handles.COGVIEW4_DECODER,),
            "conditioning": (handles.COGVIEW4_CONDITIONING,),
            "width": size_input(1024, "width", 512, " CogView4: 512..2048, at most 2^21 pixels."),
            "height": size_input(1024, "height", 512, " CogView4: 512..2048, at most 2^21 pixels."),
            "seed": seed_input(),
            "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
            "guidance": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 20.0, "step": 0.1}),
            "num_images": ("INT", {"default": 1, "min": 1, "max": 16}),
        }, "optional": {**dit_speed_inputs(), "vae": preview_vae_input()}}

    CHECKS = (Check(check_cogview4_size, ("height", "width")), DecoderRun, Check(checks.check_num_images,
                                                                                 ("num_images",)))

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, seed, steps, guidance, num_images):
        return cls.answer(locals())

    def sample(self, decoder, conditioning, width, height, seed, steps, guidance, num_images, attention="auto",
               compile=False, step_cache=0.0, vae=None):
        run = self.checked(locals())
        settings = replace(run[DecoderRun], shift_settings=decoder.shift_settings)
        cond = conditioning.cond.expand(num_images, -1, -1)
        uncond = conditioning.uncond.expand(num_images, -1, -1)
        preview = decoder_preview(COGVIEW4, vae.model if vae is not None else None, release=decoder.path)
        with self.on_device(decoder) as device:
            latents = sample_cogview4_latents(decoder.model, cond, uncond, height, width, settings, preview=preview,
                                              options=run.options, device=device)
        return ({"samples": latents.float().cpu()},)


NODE_CLASS_MAPPINGS = {"GLMImageCogView4TextEncode": GLMImageCogView4TextEncode,
                       "GLMImageCogView4Sampler": GLMImageCogView4Sampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogView4TextEncode": "CogView4 Text Encode",
                              "GLMImageCogView4Sampler": "CogView4 Sampler"}
