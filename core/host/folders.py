"""ComfyUI's model folders: registering the pack's, listing the choices of a loader, and turning a choice into a path
(plain paths outside ComfyUI)."""
from __future__ import annotations

import os

try:  # pragma: no cover - exercised only inside ComfyUI
    import folder_paths as _folder_paths
except Exception:  # ImportError, or a partial ComfyUI tree
    _folder_paths = None

RELEASE_FOLDER = "glm_image"          # whole diffusers-format release folders
# .gguf files live in the standard folders; ComfyUI-GGUF lists them under these keys (same paths, .gguf only)
GGUF_KEYS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}


def register_model_folders() -> None:
    """Register the ``glm_image`` folder (release folders) and the GGUF views of the diffusion_models (models/unet
    too) and text_encoders folders with ComfyUI."""
    if _folder_paths is None:
        return
    path = os.path.join(_folder_paths.models_dir, RELEASE_FOLDER)
    if RELEASE_FOLDER not in _folder_paths.folder_names_and_paths:
        _folder_paths.folder_names_and_paths[RELEASE_FOLDER] = ([path], set())
    for kind, key in GGUF_KEYS.items():
        if key not in _folder_paths.folder_names_and_paths and kind in _folder_paths.folder_names_and_paths:
            _folder_paths.folder_names_and_paths[key] = (_folder_paths.folder_names_and_paths[kind][0], {".gguf"})


def list_release_folders() -> list[str]:
    """Names of release folders (those with a model_index.json) in ComfyUI's ``glm_image`` folders."""
    if _folder_paths is None:
        return []
    names = []
    for base in _folder_paths.get_folder_paths(RELEASE_FOLDER):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if os.path.isfile(os.path.join(base, name, "model_index.json")):
                    names.append(name)
    return names


def list_single_files(kind: str) -> list[str]:
    if _folder_paths is None:
        return []
    return [n for n in _folder_paths.get_filename_list(kind) if n.endswith(".safetensors")]


def list_gguf_files(kind: str) -> list[str]:
    """``.gguf`` files in ComfyUI's ``kind`` folders (diffusion_models also covers models/unet)."""
    key = GGUF_KEYS.get(kind)
    if _folder_paths is None or key is None or key not in _folder_paths.folder_names_and_paths:
        return []
    return [n for n in _folder_paths.get_filename_list(key) if n.endswith(".gguf")]


def list_pt_files(kind: str) -> list[str]:
    """Legacy ``.pt``/``.pth`` files in ComfyUI's ``kind`` folders (read with ``weights_only=True``)."""
    if _folder_paths is None:
        return []
    return [n for n in _folder_paths.get_filename_list(kind) if n.endswith((".pt", ".pth"))]


def list_model_dirs(kind: str) -> list[str]:
    """Sub-folders holding a config.json in ComfyUI's ``kind`` folders (multi-file models such as GLM-V)."""
    if _folder_paths is None:
        return []
    names = []
    for base in _folder_paths.get_folder_paths(kind):
        if os.path.isdir(base):
            names += [n for n in sorted(os.listdir(base)) if os.path.isfile(os.path.join(base, n, "config.json"))]
    return names


def resolve_checkpoint(name: str, kind: str) -> str:
    """Turn a loader's choice into a path: an absolute path as is, else a release folder name in
    ``models/glm_image`` or a file name in the ComfyUI folder ``kind``."""
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        if not os.path.exists(expanded):
            raise FileNotFoundError(f"{name} does not exist.")
        return expanded
    if _folder_paths is not None:
        for base in _folder_paths.get_folder_paths(RELEASE_FOLDER):
            candidate = os.path.join(base, name)
            if os.path.isdir(candidate):
                return candidate
        for base in _folder_paths.get_folder_paths(kind):
            candidate = os.path.join(base, name)
            if os.path.isdir(candidate):
                return candidate
        path = _folder_paths.get_full_path(kind, name)
        if path:
            return path
    raise FileNotFoundError(
        f"Checkpoint {name!r} not found. Put a release folder in models/{RELEASE_FOLDER}/, a single file in "
        f"models/{kind}/, or give an absolute path.")


LORA_FOLDER = "loras"


def list_lora_files() -> list[str]:
    """The files of ComfyUI's ``loras`` folders (a PEFT adapter shows as ``<folder>/adapter_model.safetensors``)."""
    if _folder_paths is None:
        return []
    return list(_folder_paths.get_filename_list(LORA_FOLDER))


def resolve_lora(name: str) -> str:
    """A LoRA node's choice as a path: a path as is, else a file (or PEFT adapter folder) in ``models/loras``."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    if _folder_paths is not None and not os.path.isabs(expanded):
        path = _folder_paths.get_full_path(LORA_FOLDER, name)
        if path:
            return path
        for base in _folder_paths.get_folder_paths(LORA_FOLDER):
            if os.path.isdir(os.path.join(base, name)):
                return os.path.join(base, name)
    raise FileNotFoundError(f"LoRA {name!r} not found. Put it in models/{LORA_FOLDER}/ (a PEFT adapter as its "
                            f"folder), or give a path.")
