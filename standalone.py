"""Use the pack outside ComfyUI: register this folder as the package ``glm_image_nodes``.

ComfyUI imports the pack under its folder's name; tests, the demo and scripts import it as
``glm_image_nodes`` through ``register_pack()``, without running the pack's ``__init__``.
"""
import os
import sys
import types

PACKAGE = "glm_image_nodes"
ROOT = os.path.dirname(os.path.abspath(__file__))


def register_pack() -> types.ModuleType:
    if PACKAGE not in sys.modules:
        module = types.ModuleType(PACKAGE)
        module.__path__ = [ROOT]
        module.__file__ = os.path.join(ROOT, "__init__.py")
        sys.modules[PACKAGE] = module
    return sys.modules[PACKAGE]
