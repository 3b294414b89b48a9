"""Where a model's weights live while a stage runs.

Outside ComfyUI, ``resident`` is the stage swap: the weights go to the compute device for the stage, and after
it every tensor points back at the storage it had (the memory-mapped file pages, or the offload copy): nothing is
copied back and nothing new is allocated in RAM. With ``blocks`` (block swap) those transformer blocks stay on the
offload device and each is copied in just before it runs and dropped after, so a model larger than the GPU runs
at the price of one block's transfer per block per forward.

Inside ComfyUI its own memory manager places the weights (see ``host.memory``); ``streamable`` makes every
module of a model cope with being left on the offload device by a partial load.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..formats.layers import PackedLayer


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for t in list(module._parameters.values()) + list(module._buffers.values()):
        if t is not None:
            yield t


def _tensors(modules: Sequence[nn.Module], skip: set[int] = frozenset()) -> list[torch.Tensor]:
    seen, out = set(skip), []
    for root in modules:
        for module in root.modules():
            for t in _own_tensors(module):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def _point_to(tensors: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give each tensor a copy of its data on ``device``; returns what to restore (a failure, such as running out
    of memory half way, restores what was already moved before it propagates)."""
    moved = []
    try:
        for t in tensors:
            if t.device != device:
                data = t.data
                t.data = data.to(device, non_blocking=True)
                moved.append((t, data))
    except BaseException:
        _restore(moved)
        raise
    return moved


def _restore(moved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for t, data in moved:
        t.data = data


def resolve_blocks(model: nn.Module, path: str | None, count: int) -> list[nn.Module]:
    """The first ``count`` blocks of ``model.<path>`` (e.g. ``layers``, ``transformer_blocks``)."""
    if count <= 0:
        return []
    if path is None:
        raise ValueError(f"block swap: {type(model).__name__} has no transformer blocks to swap; use stage swap "
                         f"(block_swap 0).")
    blocks = model
    for part in path.split("."):
        blocks = getattr(blocks, part)
    if count > len(blocks):
        raise ValueError(f"block swap: {count} blocks requested but {type(model).__name__} has {len(blocks)}; "
                         f"choose at most {len(blocks)}.")
    return list(blocks)[:count]


@contextmanager
def resident(module: nn.Module, device: torch.device, blocks: Sequence[nn.Module] = ()):
    """Run ``module`` on ``device`` (see the module docstring); ``blocks`` are streamed one at a time. Yields
    ``device``: the caller passes it to the stage, which computes there wherever the weights are."""
    device = torch.device(device)
    swapped = {id(t) for t in _tensors(blocks)}
    moved = _point_to(_tensors([module], skip=swapped), device)
    hooks = []
    for block in blocks:
        state: dict[str, list] = {}

        def stream_in(block, args, state=state):
            state["moved"] = _point_to(_tensors([block]), device)

        def stream_out(block, args, output, state=state):
            _restore(state.pop("moved", []))

        hooks += [block.register_forward_pre_hook(stream_in), block.register_forward_hook(stream_out)]
    try:
        yield device
    finally:
        for hook in hooks:
            hook.remove()
        _restore(moved)


def _input_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _stream_in(module: nn.Module, args) -> None:
    device = _input_device(args)
    if device is not None:
        moved = _point_to(list(_own_tensors(module)), device)
        if moved:
            module.__dict__["_streamed"] = moved


def _stream_out(module: nn.Module, args, output) -> None:
    _restore(module.__dict__.pop("_streamed", []))


def streamable(model: nn.Module) -> nn.Module:
    """Let ComfyUI leave any module of ``model`` on the offload device (partial loading): the pack's Linear and
    Embedding copy their weight per call already; every other module holding weights (norms, convolutions) gets
    ``comfy_cast_weights`` and hooks that bring its own tensors to the input's device for the call."""
    if getattr(model, "_glm_streamable", False):
        return model
    for module in model.modules():
        if isinstance(module, PackedLayer) or not any(True for _ in _own_tensors(module)):
            continue
        module.comfy_cast_weights = False
        module.register_forward_pre_hook(_stream_in)
        module.register_forward_hook(_stream_out)
    model._glm_streamable = True
    return model
