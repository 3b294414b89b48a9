"""Finding a component's files and configs, opening safetensors with clear errors, and the dtype choices.

Supported layouts:
- a component folder of the official release (``config.json`` plus ``model.safetensors``,
  ``diffusion_pytorch_model.safetensors`` or sharded files with a ``*.safetensors.index.json``);
- a single ``.safetensors`` file (``core/formats`` adds scaled-FP8 safetensors and GGUF files).

Models are built on the meta device and filled by ``components.load_component``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from safetensors import safe_open

INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used, with what to do about it."""


class ConfigNotInferable(CheckpointError):
    """A single file's shapes do not give its config; a ``config.json`` beside the file is read instead."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"Missing file {path}. Point the loader at the component folder of the release "
                              f"(it must contain config.json) or at a single .safetensors file.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download that file.") from e


def read_config(folder: str) -> dict:
    return read_json(os.path.join(folder, "config.json"))


def safetensors_files(path: str) -> list[str]:
    """The safetensors files that make up a checkpoint at ``path`` (file or component folder)."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (convert other formats first).")
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist.")
    indexes = sorted(n for n in os.listdir(path) if n.endswith(INDEX_SUFFIX))
    if indexes:
        index = read_json(os.path.join(path, indexes[0]))
        shards = sorted(set(index.get("weight_map", {}).values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{path}: the index {indexes[0]} lists shards that are missing: "
                                  f"{', '.join(os.path.basename(m) for m in missing)}. Download them too.")
        return files
    for name in SINGLE_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if found:
        return [os.path.join(path, n) for n in found]
    raise CheckpointError(f"{path}: no .safetensors weights found (expected one of {', '.join(SINGLE_NAMES)} "
                          f"or sharded files with a *{INDEX_SUFFIX}).")


@contextmanager
def open_safetensors(file: str):
    """``safe_open`` with an error that names the file when it is truncated or not safetensors."""
    try:
        handle = safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError has no stable import path across versions
        raise CheckpointError(f"{file} cannot be read as safetensors ({e}). The file is incomplete or "
                              f"corrupt: download it again.") from e
    with handle as sf:
        yield sf


@contextmanager
def meta_device():
    with torch.device("meta"):
        yield


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_dtype(choice: str, device: torch.device | str, *, component: str,
                  fp16_reason: str | None = None) -> torch.dtype:
    """Map a loader's dtype widget to a torch dtype. ``auto`` is bf16 on GPUs that support it, else fp32."""
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type in ("mps", "xpu"):
            return torch.bfloat16
        return torch.float32
    if choice == "fp16" and fp16_reason:
        raise CheckpointError(f"{component} cannot run in fp16: {fp16_reason} Choose bf16 or fp32.")
    if choice not in DTYPES:
        raise CheckpointError(f"{component}: unknown dtype {choice!r}; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[choice]


def component_path(path: str, subfolder: str) -> str:
    """``path`` may be a release root (with ``model_index.json``), a component folder or a single file;
    return the component's folder or file."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        sub = os.path.join(path, subfolder)
        if not os.path.isdir(sub):
            raise CheckpointError(f"{path} is a release folder but has no {subfolder}/ component. "
                                  f"Download that folder of the release, or choose the component's own file.")
        return sub
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist.")
    return path


def release_roots(path: str) -> tuple[str, str]:
    """Where the release of the component at ``path`` (release root, component folder or file) may be: the
    folder itself (or the file's folder), then one folder up; its siblings (``scheduler/``, ``vae/``) live there."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return folder, os.path.dirname(os.path.abspath(folder))


def config_or_none(path: str) -> dict | None:
    """The component's config.json when ``path`` is a folder (or a file with a config.json beside it)."""
    folder = path if os.path.isdir(path) else None
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        return read_config(folder)
    return None
