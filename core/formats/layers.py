"""The pack's Linear and Embedding: one layer type whose weight is plain, FP8 + scale or GGUF-packed, turned into
the compute dtype on the compute device each time the layer runs (like ``comfy.ops`` and ComfyUI-GGUF's
``GGMLOps``). See the package docstring for the patch hook and the rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cuda import dispatch
from . import direct_dequant, fp8, fused_dequant

WeightPatch = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Packed:
    """A weight stored in a packed format. ``kind``: ``"fp8"`` or a GGML type name (``"Q4_K"``...);
    ``data``: the float8 tensor ``[out, in]`` or the raw GGUF bytes ``[rows, bytes_per_row]``; ``shape``: the
    dequantized shape; ``scale``: the FP8 scale (``()`` or ``[out, 1]``)."""
    data: torch.Tensor
    kind: str
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra


def dequantize_packed(data: torch.Tensor, kind: str, shape: tuple[int, ...], scale: torch.Tensor | None,
                      dtype: torch.dtype, mode: str | None = None) -> torch.Tensor:
    """``data`` (FP8 or GGUF bytes) as ``dtype``: in one pass where the fused op applies (CUDA, ``mode`` the
    kernel mode, default ``GLMIMAGE_KERNELS``; fused_dequant), else the torch route."""
    if fused_dequant.applies(data, kind, scale, dtype, mode):
        return fused_dequant.dequantize(data, kind, shape, scale, dtype)
    if kind == "fp8":
        return fp8.dequantize(data, scale, dtype)
    return direct_dequant.gguf_in(data, kind, shape, dtype)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


class PackedLayer:
    """What the pack's Linear and Embedding add to torch's: the packed weight, the compute dtype, the patches.

    ``weight_patches``: the pack's own patch list (LoRA deltas). Each entry is a callable ``patch(weight) ->
    weight`` applied, in order, to the weight after it is dequantized to the compute dtype on the compute
    device, before the layer uses it. ``weight_function`` / ``bias_function``: ComfyUI's lists of the same kind
    (its low-VRAM LoRA patches), applied first; ComfyUI's model management clears them when it reloads a model,
    so the pack keeps its own list apart. ``comfy_cast_weights`` marks the layer as one ComfyUI may leave on the
    offload device (partial loading): the layer then copies its weight to the input's device per call.
    """
    comfy_cast_weights = False
    weight_kind: str = "plain"            # "plain", "fp8" or a GGML type name
    weight_shape: tuple[int, ...] = ()
    compute_dtype: torch.dtype = torch.float32

    def _init_packing(self, compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype
        self.weight_patches: list[WeightPatch] = []
        self.weight_function: list[WeightPatch] = []
        self.bias_function: list[WeightPatch] = []
        self.weight_kind = "plain"
        self.weight_shape = tuple(self.weight.shape)

    def assign_weight(self, weight: torch.Tensor | Packed, device: torch.device) -> None:
        # not ``set_weight``: ComfyUI's ModelPatcher takes a module's ``set_<param>`` for its own re-quantizing hook
        if isinstance(weight, Packed):
            self.weight = nn.Parameter(weight.data.to(device), requires_grad=False)
            self.weight_kind, self.weight_shape = weight.kind, tuple(weight.shape)
            if weight.scale is not None:
                self.register_buffer(fp8.SCALE, weight.scale.to(device=device, dtype=torch.float32))
        else:
            self.weight = nn.Parameter(weight.to(device=device, dtype=self.compute_dtype), requires_grad=False)
            self.weight_kind, self.weight_shape = "plain", tuple(weight.shape)

    @property
    def is_packed(self) -> bool:
        return self.weight_kind != "plain"

    @property
    def patched(self) -> bool:
        return bool(self.weight_patches or self.weight_function)

    def add_weight_patch(self, patch: WeightPatch) -> None:
        """Append a patch (see the class docstring); it must return a weight of the layer's shape."""
        self.weight_patches.append(patch)

    def compute_weight(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the layer uses it: dequantized to ``dtype`` (default the compute dtype) on ``device``,
        with ComfyUI's ``weight_function`` and then the pack's ``weight_patches`` applied."""
        dtype = dtype or self.compute_dtype
        data = _on(self.weight, device)
        if self.weight_kind == "plain":
            weight = data.to(dtype, copy=bool(self.weight_function))  # ComfyUI's patches work in place
        else:
            scale = getattr(self, fp8.SCALE, None)
            weight = dequantize_packed(data, self.weight_kind, self.weight_shape,
                                       _on(scale, device) if scale is not None else None, dtype)
            if self.weight_function and weight.data_ptr() == self.weight.data_ptr():
                weight = weight.clone()  # a GGUF float weight in its own dtype is the stored one: patched in place
        for patch in [*self.weight_function, *self.weight_patches]:
            patched = patch(weight)
            if tuple(patched.shape) != self.weight_shape:
                raise ValueError(f"A weight patch of a {type(self).__name__} {self.weight_shape} returned shape "
                                 f"{tuple(patched.shape)}; a patch (e.g. a LoRA delta) must keep the shape.")
            weight = patched.to(dtype)
        return weight

    def compute_bias(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        if bias is None:
            return None
        bias = _on(bias, device).to(dtype)
        for patch in self.bias_function:
            bias = patch(bias)
        return bias


class Linear(PackedLayer, nn.Linear):
    """``nn.Linear`` with a plain, FP8 or GGUF weight. A plain weight on the input's device runs exactly as
    ``nn.Linear``; FP8 uses ``torch._scaled_mm`` where the GPU has FP8 math and nothing patches the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_kind == "plain" and not self.patched and self.weight.device == x.device:
            return F.linear(x, self.weight, self.bias)
        device, dtype = x.device, x.dtype if x.is_floating_point() else self.compute_dtype
        if self.weight_kind == "fp8" and not self.patched and dtype in (torch.bfloat16, torch.float16):
            if (fp8.has_fp8_matmul(device) and fp8.fits_scaled_mm(self.weight)
                    and dispatch.use_checked("scaled_mm", x)):
                return fp8.scaled_mm_linear(x, _on(self.weight, device), _on(self.scale_weight, device),
                                            self.compute_bias(device, dtype))
        return F.linear(x, self.compute_weight(device, dtype), self.compute_bias(device, dtype))


class Embedding(PackedLayer, nn.Embedding):
    """``nn.Embedding`` with a plain, FP8 or GGUF weight; packed tables dequantize only the rows looked up,
    on the table's device, and hand them to the ids' device."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_kind == "plain" and not self.patched and self.weight.device == ids.device:
            return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        if self.patched:
            return F.embedding(ids, self.compute_weight(ids.device), self.padding_idx)
        rows = ids.to(self.weight.device).reshape(-1)
        packed = self.weight[rows]
        shape = (rows.numel(), self.weight_shape[-1])
        if self.weight_kind == "plain":
            out = packed.to(self.compute_dtype)
        else:
            scale = getattr(self, fp8.SCALE, None)
            if scale is not None and scale.dim():
                scale = scale[rows]
            out = dequantize_packed(packed, self.weight_kind, shape, scale, self.compute_dtype)
        return out.to(ids.device, non_blocking=True).reshape(*ids.shape, -1)


SWAPS = {nn.Linear: Linear, nn.Embedding: Embedding}


def adopt(module: nn.Module, compute_dtype: torch.dtype) -> PackedLayer | None:
    """Turn an ``nn.Linear`` / ``nn.Embedding`` (built on any device) into the pack's layer in place; None for
    other modules."""
    target = SWAPS.get(type(module))
    if target is None:
        return module if isinstance(module, PackedLayer) else None
    module.__class__ = target
    module._init_packing(compute_dtype)
    return module


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its weight's for torch layers, the compute dtype for packed ones."""
    if isinstance(layer, PackedLayer):
        return layer.compute_dtype
    return layer.weight.dtype
