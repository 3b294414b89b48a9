"""Thin node classes; each validates its inputs, calls one core function and wraps the result."""
from .conditioning import glyph, references
from .loaders import glm_image as glm_image_loaders
from .sampling import ar, caption, decoder, vae

_MODULES = (glm_image_loaders, ar, glyph, decoder, vae, references, caption)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
