"""glm-image-nodes: GLM-Image, CogView4 and CogView VQ as native ComfyUI nodes.

The node mappings load on first access (PEP 562 module ``__getattr__``): ComfyUI reads them right after importing
the pack (``hasattr(module, "NODE_CLASS_MAPPINGS")``), while the torch-free parts, such as the installed
``glm-image-client``, start without importing torch.
"""
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .core.host.folders import register_model_folders
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    register_model_folders()
    globals().update(NODE_CLASS_MAPPINGS=NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS=NODE_DISPLAY_NAME_MAPPINGS)
    return globals()[name]
