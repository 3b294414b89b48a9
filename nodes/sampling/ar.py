"""AR token sampling: prompt (and optional reference images) -> a semantic-VQ token grid."""
from __future__ import annotations

from ...core.runtime import checks
from ...core.runtime.geometry import check_glm_image_size
from ...core.stages import handles
from ...core.stages.ar_sampling import generate_token_grid, generation_memory
from ...core.stages.settings import DECODE_STEPS, ARSampling
from ...core.stages.token_preview import ar_preview
from ..common import Check, attention_input, seed_input, size_input
from ..sampler_node import SamplerNode

SAME_AS_REFERENCE = " 0: the size of the first reference image (editing)."


def output_size(width: int, height: int, references) -> tuple[int, int]:
    """The size to generate, checked: the widgets', where 0 takes the first reference image's."""
    if not (width and height):
        if references is None:
            raise ValueError("width and height 0 mean the size of the first reference image, but no references are "
                             "connected: connect references or set the output size.")
        ref_height, ref_width = references.sizes[0]
        width, height = width or ref_width, height or ref_height
    check_glm_image_size(height, width)
    return width, height


def check_output_size(width: int, height: int) -> None:
    """A size given on the widgets (0 takes the reference's, known only when the node runs)."""
    if width and height:
        check_glm_image_size(height, width)


class GLMImageARSampler(SamplerNode):
    DESCRIPTION = ("Runs the GLM AR model: writes the grid of semantic-VQ tokens (1/32 of the output size) for the "
                   "prompt. With references it edits: their tokens enter the context and only the target grid is "
                   "generated.")
    RETURN_TYPES = (handles.TOKENS, "STRING")
    RETURN_NAMES = ("tokens", "prompt")
    OUTPUT_TOOLTIPS = ("The token grid for the decoder sampler.",
                       "The prompt, unchanged: connect it to Glyph Conditioning's prompt so it is typed once.")
    STAGE = "AR token sampling"
    ADVICE = "lower num_images or the output size"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ar_model": (handles.AR_MODEL,),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Put text to render in the image in quotes."}),
                "width": size_input(1024, "width", 0, SAME_AS_REFERENCE),
                "height": size_input(1024, "height", 0, SAME_AS_REFERENCE),
                "seed": seed_input(),
                "temperature": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 2.0, "step": 0.01,
                                          "tooltip": "0: greedy (the most likely codebook id at every step)."}),
                "top_p": ("FLOAT", {"default": 0.75, "min": 0.01, "max": 1.0, "step": 0.01}),
                "top_k": ("INT", {"default": 16512, "min": 1, "max": 16512,
                                  "tooltip": "16512 (the vision vocabulary) disables top-k."}),
                "num_images": ("INT", {"default": 1, "min": 1, "max": 16,
                                       "tooltip": "Images decoded together in one AR loop."}),
            },
            "optional": {
                "references": (handles.REFERENCES, {"tooltip": "Reference images for editing."}),
                "attention": attention_input(),
                "decode_steps": (list(DECODE_STEPS), {"default": "eager", "tooltip": (
                    "eager: one step after the other; cuda graph: the step captured once and replayed per token "
                    "(CUDA); compiled: torch.compile'd step (fullgraph), captured on CUDA; the first run compiles "
                    "(about a minute). Same tokens for a seed.")}),
            },
        }

    CHECKS = (Check(checks.check_prompt, ("prompt",)), Check(check_output_size, ("width", "height")), ARSampling)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, width, height, seed, temperature, top_p, top_k, num_images):
        return cls.answer(locals())

    def sample(self, ar_model, prompt, width, height, seed, temperature, top_p, top_k, num_images, references=None,
               attention="auto", decode_steps="eager"):
        run = self.checked(locals())
        width, height = output_size(width, height, references)
        source_grids = references.token_ids if references is not None else None
        settings = run[ARSampling]
        reserve = generation_memory(ar_model.model, ar_model.tokenizer, prompt, height, width, settings,
                                    source_grids)  # the KV cache: placed before the capture decision
        with self.on_device(ar_model, memory_required=reserve) as device:
            grid = generate_token_grid(ar_model.model, ar_model.tokenizer, prompt, height, width, settings,
                                       source_grids=source_grids,
                                       preview=ar_preview(ar_model.model, ar_model.vocabulary.codebook_size),
                                       options=run.options, device=device)
        return grid, prompt


NODE_CLASS_MAPPINGS = {"GLMImageARSampler": GLMImageARSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageARSampler": "GLM-Image AR Token Sampler"}
