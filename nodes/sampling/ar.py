"""AR token sampling: prompt (and optional reference images) -> a semantic-VQ token grid."""
from __future__ import annotations

from ...core.host import memory
from ...core.runtime import checks
from ...core.runtime.attention import attention_backend, check_backend
from ...core.runtime.geometry import check_glm_image_size
from ...core.stages import handles
from ...core.stages.ar_sampling import DECODE_STEPS, check_sampling_settings, generate_token_grid, generation_memory
from ...core.stages.token_preview import ar_preview
from ..common import answer, attention_input, category, check_now, seed_input, size_input

SAME_AS_REFERENCE = " 0: the size of the first reference image (editing)."


def output_size(width: int, height: int, references) -> tuple[int, int]:
    if width and height:
        return width, height
    if references is None:
        raise ValueError("width and height 0 mean the size of the first reference image, but no references are "
                         "connected: connect references or set the output size.")
    ref_height, ref_width = references.sizes[0]
    return width or ref_width, height or ref_height


def check_output_size(width: int, height: int) -> None:
    """A size given on the widgets (0 takes the reference's, known only when the node runs)."""
    if width and height:
        check_glm_image_size(height, width)


class GLMImageARSampler:
    DESCRIPTION = ("Runs the GLM AR model: writes the grid of semantic-VQ tokens (1/32 of the output size) for the "
                   "prompt. With references it edits: their tokens enter the context and only the target grid is "
                   "generated.")
    CATEGORY = category("sampling")
    RETURN_TYPES = (handles.TOKENS, "STRING")
    RETURN_NAMES = ("tokens", "prompt")
    OUTPUT_TOOLTIPS = ("The token grid for the decoder sampler.",
                       "The prompt, unchanged: connect it to Glyph Conditioning's prompt so it is typed once.")
    FUNCTION = "sample"

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

    CHECKS = (checks.check_prompt, check_output_size, checks.check_seed, check_sampling_settings)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, width, height, seed, temperature, top_p, top_k, num_images):
        return answer(cls, locals(), *cls.CHECKS)

    def sample(self, ar_model, prompt, width, height, seed, temperature, top_p, top_k, num_images, references=None,
               attention="auto", decode_steps="eager"):
        check_now(locals(), *self.CHECKS)
        width, height = output_size(width, height, references)
        check_glm_image_size(height, width)
        check_backend(attention)
        source_grids = references.token_ids if references is not None else None
        reserve = generation_memory(ar_model.model, ar_model.tokenizer, prompt, height, width, num_images,
                                    source_grids, decode_steps)  # the KV cache: placed before the capture decision
        with memory.on_compute_device(
                ar_model, stage="AR token sampling", advice="lower num_images or the output size",
                memory_required=reserve), \
                attention_backend(attention):
            decode_steps = memory.capturable_steps(ar_model, decode_steps)
            grid = generate_token_grid(ar_model.model, ar_model.tokenizer, prompt, height, width, seed=seed,
                                       temperature=temperature, top_p=top_p, top_k=top_k, num_images=num_images,
                                       source_grids=source_grids,
                                       preview=ar_preview(ar_model.model, ar_model.vocabulary.codebook_size),
                                       decode_steps=decode_steps)
        return grid, prompt


NODE_CLASS_MAPPINGS = {"GLMImageARSampler": GLMImageARSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageARSampler": "GLM-Image AR Token Sampler"}
