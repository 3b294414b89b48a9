"""The AR's text tokenizer and vocabulary alone, for a worker whose AR runs on a server."""
from __future__ import annotations

from ...core.host import folders
from ...core.stages import handles
from ...core.stages.ar_prompt import load_text_tokenizer
from ..common import category, checkpoint_input


class GLMImageARTokenizerLoader:
    DESCRIPTION = ("Loads only the AR prompt's text tokenizer (processor/tokenizer.json) and the AR config's "
                   "special ids, never the 9B weights: what the AR Token Sampler (server) needs on a worker.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (handles.AR_TOKENIZER,)
    RETURN_NAMES = ("ar_tokenizer",)
    FUNCTION = "load"
    FOLDER = "text_encoders"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkpoint": checkpoint_input(cls.FOLDER, (
            "Release folder in models/glm_image (its processor/ and vision_language_encoder/config.json are read), "
            "or a file with the release's processor/tokenizer.json beside it."))}}

    def load(self, checkpoint):
        return (load_text_tokenizer(folders.resolve_checkpoint(checkpoint, self.FOLDER)),)


NODE_CLASS_MAPPINGS = {"GLMImageARTokenizerLoader": GLMImageARTokenizerLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageARTokenizerLoader": "GLM-Image AR Tokenizer Loader"}
