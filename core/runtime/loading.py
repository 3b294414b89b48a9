"""Reading configs and safetensors checkpoints, and filling models built on the meta device.

Supported layouts:
- a component folder of the official release (``config.json`` plus ``model.safetensors``,
  ``diffusion_pytorch_model.safetensors`` or sharded files with a ``*.safetensors.index.json``);
- a single ``.safetensors`` file.

A model is built on the meta device and its parameters are assigned straight from the
(memory-mapped) safetensors tensors, so a 9B model is never held twice in RAM.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from safetensors import safe_open

INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used, with what to do about it."""


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


def checkpoint_keys(path: str) -> list[str]:
    keys: list[str] = []
    for f in safetensors_files(path):
        with open_safetensors(f) as sf:
            keys.extend(sf.keys())
    return keys


def checkpoint_shapes(path: str, keep: Callable[[str], bool] | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint, from the safetensors headers only (no tensor data is read)."""
    shapes = {}
    for f in safetensors_files(path):
        with open_safetensors(f) as sf:
            for key in sf.keys():
                if keep is None or keep(key):
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
    return shapes


def load_state_dict(path: str, keep: Callable[[str], bool] | None = None,
                    strip_prefix: str | Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Load tensors from a file or component folder; ``keep`` filters keys before any data is read."""
    prefixes = (strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix)
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        with open_safetensors(f) as sf:
            for key in sf.keys():
                if keep is not None and not keep(key):
                    continue
                name = key
                for p in prefixes:
                    if p and name.startswith(p):
                        name = name[len(p):]
                        break
                out[name] = sf.get_tensor(key)
    return out


@contextmanager
def meta_device():
    with torch.device("meta"):
        yield


def fill_module(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                keep_fp32: Callable[[str], bool] | None = None, ignore: Callable[[str], bool] | None = None) -> torch.nn.Module:
    """Assign ``state_dict`` into a meta-built ``module`` (strict), casting floating tensors to ``dtype``.

    ``keep_fp32(name)`` marks tensors that stay in float32 whatever ``dtype`` is.
    ``ignore(name)`` marks checkpoint keys that are expected but not used (they are dropped).
    """
    expected = set(module.state_dict().keys())
    given = {k: v for k, v in state_dict.items() if not (ignore and ignore(k))}
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts) +
                              ". Check that this file is the right component of the release.")
    own = module.state_dict()
    converted = {}
    for k, v in given.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)} but the config expects "
                                  f"{tuple(own[k].shape)}. The config.json and the weights disagree.")
        if v.is_floating_point():
            target = torch.float32 if (keep_fp32 and keep_fp32(k)) else (dtype or v.dtype)
            v = v.to(device=device, dtype=target)
        else:
            v = v.to(device=device)
        converted[k] = v
    module.load_state_dict(converted, strict=True, assign=True)
    return module.eval().requires_grad_(False)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_dtype(choice: str, device: torch.device | str, *, component: str, fp16_reason: str | None = None) -> torch.dtype:
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


def config_or_none(path: str) -> dict | None:
    """The component's config.json when ``path`` is a folder (or a file with a config.json beside it)."""
    folder = path if os.path.isdir(path) else None
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        return read_config(folder)
    return None
