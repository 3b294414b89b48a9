"""Memory on the compute device: ComfyUI's ``ModelPatcher`` and ``load_models_gpu`` inside ComfyUI, stage swap and
block swap outside, and out-of-memory errors that name the stage and what to lower."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

from ..runtime.devices import get_device, offload_device
from .interrupts import run_scope

log = logging.getLogger("glm_image_nodes")

try:  # pragma: no cover - exercised only inside ComfyUI
    import comfy.model_management as _mm
except Exception:  # ImportError, or a partial ComfyUI tree
    _mm = None


def soft_empty_cache() -> None:
    if _mm is not None:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory(device: torch.device, need: int = 0) -> int | None:
    """Bytes free for new tensors on ``device`` (None when unknown). Inside ComfyUI its memory manager first
    unloads other models to make room for ``need`` bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        if _mm is not None and need:
            _mm.free_memory(need, device)
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    return None


class OutOfMemory(torch.OutOfMemoryError):
    """Out of device memory, with the stage that ran out and what to lower. A ``torch.OutOfMemoryError``, so
    ComfyUI's own recovery (unloading its models) still runs."""


def _weight_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def _module(item) -> torch.nn.Module:
    """A handle's weights (``handle.module``) or a bare module."""
    return item.module if hasattr(item, "module") else item


MANAGED_PREFIX = "net."  # where the pack's model sits in the ModelPatcher's container: its keys in patches


class _Managed(torch.nn.Module):
    """What ComfyUI's ModelPatcher holds: the pack's model as ``net`` (the patcher sets attributes such as
    ``device`` on the object it manages, which the pack's models keep as properties)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net


_managed_classes: dict[str, type] = {}


def _managed(net: torch.nn.Module) -> _Managed:
    """A ``_Managed`` subclass named after the model, so ComfyUI's log says "Requested to load GlmImageDiT"."""
    name = type(net).__name__
    if name not in _managed_classes:
        _managed_classes[name] = type(name, (_Managed,), {"__doc__": _Managed.__doc__})
    return _managed_classes[name](net)


_told: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        log.info(message)


def model_patcher(item):
    """The ComfyUI ``ModelPatcher`` of a handle, made on first use and kept on the handle, so ComfyUI's
    ``load_models_gpu`` keeps the model resident between runs, evicts it for other models, or loads it
    partially (the rest streamed per layer)."""
    from ..loading.residency import streamable
    from .comfy_patcher import PackModelPatcher, comfy_lora_patcher

    patcher = getattr(item, "patcher", None)
    if patcher is None:
        if getattr(item, "loras", ()):  # a LoRA handle: a clone of its base's patcher with the LoRA patches
            patcher = comfy_lora_patcher(model_patcher(item.base), item.loras, prefix=MANAGED_PREFIX)
        else:
            patcher = PackModelPatcher(_managed(streamable(_module(item))), load_device=get_device(),
                                       offload_device=offload_device())
        item.patcher = patcher
    return patcher


@contextmanager
def _comfy_placement(items, device: torch.device, memory_required: int):
    from contextlib import ExitStack

    from ..loading.residency import resident

    for item in items:
        if getattr(item, "block_swap", 0):
            _say_once("block_swap", "block_swap is not used inside ComfyUI: its memory manager keeps what fits "
                                    "on the GPU and streams the rest layer by layer (partial loading).")
    handles = [item for item in items if hasattr(item, "patcher")]
    _mm.load_models_gpu([model_patcher(item) for item in handles], memory_required=memory_required)
    with ExitStack() as stack:
        for item in items:
            if item not in handles:  # a bare module (scripts, tests): swapped in for the stage as outside ComfyUI
                stack.enter_context(resident(_module(item), device))
        yield device


@contextmanager
def _swap_placement(items, device: torch.device):
    from contextlib import ExitStack

    from ..loading.lora_patches import installed
    from ..loading.residency import resident, resolve_blocks

    with ExitStack() as stack:
        for item in items:
            module = _module(item)
            blocks = resolve_blocks(module, getattr(item, "blocks", None), getattr(item, "block_swap", 0))
            stack.enter_context(resident(module, device, blocks))
            stack.enter_context(installed(module, getattr(item, "loras", ())))
        yield device


@contextmanager
def on_compute_device(*items, **options):
    """``_on_compute_device`` within a ``run_scope``: a node called on its own starts a run there."""
    with run_scope(), _on_compute_device(*items, **options) as placed:
        yield placed


@contextmanager
def _on_compute_device(*items, stage: str = "this node", advice: str = "lower the image size or the number of images",
                       memory_required: int = 0):
    """Run the models of ``items`` (the pack's handles, or bare modules) on the compute device.

    Inside ComfyUI each handle's ``ModelPatcher`` goes through ComfyUI's ``load_models_gpu``: the model stays
    on the GPU after the stage while it fits, is evicted when other models need the room, and is loaded partly
    (the rest streamed per layer) when the card is too small. Outside ComfyUI the weights take the GPU only while
    the stage runs (stage swap, so the 9B AR model and the 7B decoder never sit there together); a handle's
    ``block_swap`` keeps that many of its blocks on the offload device, streamed in one at a time.
    Running out of memory frees what the stage took and says what to lower.
    Yields the compute device: the caller passes it to the stage (``device=``), since under block swap or a
    partial load the weights are partly elsewhere and cannot tell it.
    """
    device = get_device()
    modules = [_module(item) for item in items]
    weights = _weight_bytes(modules)
    placement = (_comfy_placement(items, device, memory_required) if _mm is not None
                 else _swap_placement(items, device))
    try:
        try:
            placed = placement.__enter__()
        except torch.OutOfMemoryError:
            placement = None
            raise OutOfMemory(f"Out of memory on {device} moving the weights of {stage} ({weights / 2**30:.1f} GB) "
                              f"there: unload other models or close other programs using the GPU, or load the "
                              f"model in a smaller format (fp8_e4m3fn, a GGUF file) or with block_swap.") from None
        try:
            yield placed
        except torch.OutOfMemoryError as e:
            if isinstance(e, OutOfMemory):
                raise
            raise OutOfMemory(f"Out of memory on {device} in {stage}: {advice}, or close other programs using "
                              f"the GPU. ({str(e).splitlines()[0]})") from None
    finally:
        if placement is not None:
            placement.__exit__(None, None, None)
        if _mm is None and device.type != "cpu":
            soft_empty_cache()
