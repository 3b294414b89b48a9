"""AR token sampling on a server (glm-image-serve or SGLang): prompt (and references) -> a token grid."""
from __future__ import annotations

from ...core.host import interrupts
from ...core.runtime import checks
from ...core.stages import handles
from ...core.stages.remote_ar import RemoteARError, generate_token_grid_remote, generate_url
from ...core.stages.settings import ARSampling
from ..common import Check, answer, category, check_now
from .ar import GLMImageARSampler, check_output_size, output_size

SHARED_INPUTS = ("prompt", "width", "height", "seed", "temperature", "top_p", "top_k")


def check_endpoint(endpoint: str) -> None:
    checks.check_text(endpoint, "endpoint")
    try:
        generate_url(endpoint)
    except RemoteARError as e:
        raise ValueError(str(e)) from None


class GLMImageARServerSampler:
    DESCRIPTION = ("Asks an AR server for the token grid: glm-image-serve (the pack's AR on Ray Serve: text-to-image "
                   "and editing, the same tokens as the local sampler for a seed) or an SGLang server (text-to-image "
                   "only). The worker holds no AR weights.")
    CATEGORY = category("sampling")
    RETURN_TYPES = (handles.TOKENS, "STRING")
    RETURN_NAMES = ("tokens", "prompt")
    OUTPUT_TOOLTIPS = GLMImageARSampler.OUTPUT_TOOLTIPS
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        local = GLMImageARSampler.INPUT_TYPES()["required"]  # the same widgets as the local sampler's
        return {
            "required": {
                "ar_tokenizer": (handles.AR_TOKENIZER,),
                "endpoint": ("STRING", {"default": "http://127.0.0.1:30000", "tooltip": (
                    "Base URL of glm-image-serve or an SGLang server (its POST /generate is used).")}),
                **{name: local[name] for name in SHARED_INPUTS},
            },
            "optional": {
                "references": (handles.REFERENCES, {"tooltip": "Reference images for editing (glm-image-serve only)."}),
                "timeout": ("INT", {"default": 600, "min": 1, "max": 86400,
                                    "tooltip": "Seconds to wait for the server; Stop interrupts the wait."}),
            },
        }

    CHECKS = (Check(checks.check_prompt, ("prompt",)), Check(check_output_size, ("width", "height")), ARSampling,
              Check(check_endpoint, ("endpoint",)))

    @classmethod
    def VALIDATE_INPUTS(cls, endpoint, prompt, width, height, seed, temperature, top_p, top_k):
        return answer(cls, locals(), *cls.CHECKS)

    def sample(self, ar_tokenizer, endpoint, prompt, width, height, seed, temperature, top_p, top_k, references=None,
               timeout=600):
        settings = check_now(locals(), *self.CHECKS)[ARSampling]  # one image per request
        width, height = output_size(width, height, references)
        source_grids = references.token_ids if references is not None else None
        grid = generate_token_grid_remote(endpoint, ar_tokenizer, prompt, height, width,
                                          settings, source_grids,
                                          timeout=float(timeout), interrupt_check=interrupts.check_interrupt)
        return grid, prompt


NODE_CLASS_MAPPINGS = {"GLMImageARServerSampler": GLMImageARServerSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageARServerSampler": "GLM-Image AR Token Sampler (server)"}
