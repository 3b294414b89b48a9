"""Thin node classes; each validates its inputs, calls one core function and wraps the result."""
from . import system_check
from .conditioning import glyph, references, token_grid
from .loaders import ar_tokenizer as ar_tokenizer_loader
from .loaders import captioner as captioner_loader
from .loaders import cogview4 as cogview4_loaders
from .loaders import cogview_vqvae as cogview_vqvae_loader
from .loaders import glm_image as glm_image_loaders
from .loaders import lora as lora_loaders
from .sampling import ar, ar_server, caption, cogview4, cogview_vqvae, decoder, upscale, vae

_MODULES = (glm_image_loaders, ar, glyph, decoder, vae, references, caption,
            cogview4_loaders, cogview4, cogview_vqvae, captioner_loader, cogview_vqvae_loader, upscale, token_grid,
            lora_loaders, system_check, ar_tokenizer_loader, ar_server)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
