"""glm-image-nodes: GLM-Image, CogView4 and CogView VQ as native ComfyUI nodes."""
from .core.host.folders import register_model_folders
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
