"""Captioning, caption-score reranking and prompt rewriting with a GLM-V vision-language model (through
transformers)."""
from __future__ import annotations

from ...core.host import memory
from ...core.models.captioner import PRESETS, check_caption_settings, check_rerank_prompt
from ...core.runtime import checks
from ...core.stages import handles
from ...core.stages.captioning import caption_image, rerank
from ...core.stages.prompt_enhance import LANGUAGES, check_prompt_to_enhance, enhance_prompt
from ..common import MAX_SEED, Check, answer, category, check_now


def check_caption_texts(custom_instruction: str = "", append: str = "") -> None:
    checks.check_text(custom_instruction, "custom_instruction")
    checks.check_text(append, "append")


def reply_inputs(reply: str, note: str = "") -> dict:
    """The widgets of a GLM-V reply: max_new_tokens, temperature, seed; ``reply`` names what greedy decoding
    keeps the same."""
    return {
        "max_new_tokens": ("INT", {"default": 1024, "min": 16, "max": 8192,
                                   "tooltip": "Thinking models reason first; keep this high for them."}),
        "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                  "tooltip": f"0 decodes greedily (the same {reply} every time){note}."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Used when temperature > 0."}),
    }


class GLMImageCaption:
    DESCRIPTION = ("Captions each image. 'GLM-Image prompt' writes a prompt for GLM-Image with the text to render "
                   "in quotes; captions of a batch are separated by blank lines.")
    CATEGORY = category("captioning")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("caption",)
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "captioner": (handles.CAPTIONER,),
                "image": ("IMAGE",),
                "preset": (list(PRESETS), {"default": "GLM-Image prompt"}),
                **reply_inputs("caption"),
            },
            "optional": {
                "custom_instruction": ("STRING", {"multiline": True, "default": "",
                                                  "tooltip": "Replaces the preset's instruction."}),
                "append": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Text added after each caption, e.g. an edit instruction."}),
            },
        }

    CHECKS = (Check(check_caption_settings, ("max_new_tokens", "temperature", "seed")),
              Check(check_caption_texts, (), optional=("custom_instruction", "append")))

    @classmethod
    def VALIDATE_INPUTS(cls, max_new_tokens, temperature, seed, custom_instruction=None, append=None):
        return answer(cls, locals(), *cls.CHECKS)

    def caption(self, captioner, image, preset, max_new_tokens, temperature, seed, custom_instruction="", append=""):
        check_now(locals(), *self.CHECKS)
        checks.check_image_batch(image, "image")
        with memory.on_compute_device(captioner) as device:
            captions = [caption_image(captioner.model, img, preset, max_new_tokens=max_new_tokens, seed=seed,
                                      custom_instruction=custom_instruction, temperature=temperature, device=device)
                        for img in image]
        if append.strip():
            captions = [f"{caption} {append.strip()}" for caption in captions]
        return ("\n\n".join(captions),)


class GLMImageRerank:
    DESCRIPTION = ("Reranks candidate images by CogView's caption score: the mean log-probability of the prompt "
                   "given each image under the captioner. Returns the best image, all images best first, and "
                   "the scores.")
    CATEGORY = category("captioning")
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("best", "sorted", "scores")
    FUNCTION = "rerank"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"captioner": (handles.CAPTIONER,), "images": ("IMAGE",),
                             "prompt": ("STRING", {"multiline": True, "default": ""})}}

    CHECKS = (Check(check_rerank_prompt, ("prompt",)),)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt):
        return answer(cls, locals(), *cls.CHECKS)

    def rerank(self, captioner, images, prompt):
        check_now(locals(), *self.CHECKS)
        checks.check_image_batch(images, "images")
        with memory.on_compute_device(captioner) as device:
            order, scores = rerank(captioner.model, images, prompt, device)
        report = "\n".join(f"#{rank + 1}: image {int(i)} score {float(scores[i]):.4f}" for rank, i in enumerate(order))
        return (images[order[:1]], images[order], report)


class GLMImagePromptEnhance:
    DESCRIPTION = ("Rewrites a prompt for GLM-Image with the GLM-V captioner (text only), following the official "
                   "prompt guidance: every text to render in quotes, the layout, the subjects, the light and the "
                   "style spelled out, proper nouns kept. Chinese prompts get a Chinese rewrite, others English.")
    CATEGORY = category("captioning")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "enhance"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "captioner": (handles.CAPTIONER,),
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "A short description of the image; put text to render in quotes."}),
            "language": (list(LANGUAGES), {"default": "auto",
                                           "tooltip": "Language of the rewrite; auto: Chinese when the prompt is "
                                                      "mostly Chinese, else English."}),
            **reply_inputs("rewrite", "; the official utility uses 1.0"),
        }}

    CHECKS = (Check(check_prompt_to_enhance, ("prompt",)),
              Check(check_caption_settings, ("max_new_tokens", "temperature", "seed")))

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, max_new_tokens, temperature, seed):
        return answer(cls, locals(), *cls.CHECKS)

    def enhance(self, captioner, prompt, language, max_new_tokens, temperature, seed):
        check_now(locals(), *self.CHECKS)
        with memory.on_compute_device(captioner) as device:
            return (enhance_prompt(captioner.model, prompt, language=language, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed, device=device),)


NODE_CLASS_MAPPINGS = {"GLMImageCaption": GLMImageCaption,
                       "GLMImageRerank": GLMImageRerank,
                       "GLMImagePromptEnhance": GLMImagePromptEnhance}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCaption": "GLM-V Caption",
                              "GLMImageRerank": "GLM-V Rerank (caption score)",
                              "GLMImagePromptEnhance": "GLM-V Prompt Enhance"}
