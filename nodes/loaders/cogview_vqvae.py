"""Loader for the CogView (v1) VQ-VAE."""
from __future__ import annotations

from ...core.host import folders
from ...core.models.cogview_vqvae import load_cogview_vqvae
from ...core.runtime import devices
from ...core.stages import handles
from ..common import category


class GLMImageCogViewVQVAELoader:
    DESCRIPTION = ("Loads the CogView VQ-VAE (vqvae_hard_biggerset_011.pt, read with weights_only=True, or a "
                   "safetensors copy) from models/vae or a path.")
    CATEGORY = category("loaders")
    RETURN_TYPES = (handles.COGVIEW_VQVAE,)
    RETURN_NAMES = ("vqvae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = folders.list_single_files("vae") + folders.list_pt_files("vae")
        return {"required": {"checkpoint": (choices, {"tooltip": "The CogView VQ-VAE checkpoint.",
                                                      "glm_model_file": "vae"})}}

    def load(self, checkpoint):
        path = folders.resolve_checkpoint(checkpoint, "vae")
        return (handles.ModelHandle(load_cogview_vqvae(path, device=devices.offload_device()), path=path),)


NODE_CLASS_MAPPINGS = {"GLMImageCogViewVQVAELoader": GLMImageCogViewVQVAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMImageCogViewVQVAELoader": "CogView VQ-VAE Loader"}
