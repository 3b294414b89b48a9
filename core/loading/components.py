"""One declarative description per model component (``ComponentSpec``) and the one way to load any of them
(``load_component``): find the component in a release or a file, read its config, build it on the meta device,
and fill it from the (memory-mapped) weights in whatever format they come: safetensors, scaled FP8, GGUF.

The recipe, for every component:
1. ``path`` -> the component: a release root (``model_index.json``) gives its ``subfolder``; else a component
   folder or a single ``.safetensors`` / ``.gguf`` file.
2. The config: the folder's ``config.json`` (``config_from_dict``), else the config a converted file embeds,
   else a ``config.json`` beside a single file (``config_beside_file``), else the tensor shapes
   (``config_from_shapes``).
3. ``key_map``: checkpoint keys -> module keys for the tensors to read; nothing else is touched.
4. Build on the meta device; check every key and shape against the module (the error names the tensor).
5. Fill: plain tensors are assigned (cast to the dtype only when it differs, so a bf16 file loaded in bf16 stays
   memory-mapped, never copied); FP8 and GGUF weights go packed into the pack's Linear/Embedding layers and are
   dequantized per layer at run time. The ``fp8_e4m3fn`` dtype choice quantizes the ``quantize`` roles at load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..formats import fp8, prefixes, reading
from ..formats.checkpoint import META_ARCH, Checkpoint, open_checkpoint
from ..formats.describe import convert_command, describe
from ..formats.layers import Packed, adopt, dequantize_packed
from ..formats.reading import CheckpointError
from .configs import known_fields
from .placement import FP8_CHOICE, Placement, place

log = logging.getLogger("glm_image_nodes")

# Roles of a tensor in a component that has weight formats (``ComponentSpec.quantize``):
LINEAR = "linear"          # quantized to the chosen format
MODULATION = "modulation"  # adaLN: FP8 in FP8 files, Q8_0 in GGUF files (it scales every activation)
EMBEDDING = "embedding"    # lookup tables: source precision in FP8 files (ComfyUI's convention), Q8_0 in GGUF
KEEP = "keep"              # norms, biases, input/output projections: the source precision


@dataclass(frozen=True)
class ComponentSpec:
    """What is particular to one component; ``load_component`` does the rest."""
    name: str                                               # in messages: "The GLM-Image AR model"
    architecture: str                                       # tag in converted files (GGUF general.architecture)
    subfolder: str                                          # its folder in a release
    config_type: type                                       # the typed config (a dataclass)
    build: Callable[[Any], nn.Module]
    config_from_dict: Callable[[dict, str], Any]            # the config.json -> config_type
    config_from_shapes: Callable[[dict[str, tuple[int, ...]], str], Any]  # checkpoint shapes -> config_type
    key_map: Callable[[list[str], Any], dict[str, str]] = lambda keys, config: {k: k for k in keys}
    fp16_reason: str | None = None                          # why fp16 is refused (None: allowed)
    keep_fp32: Callable[[str], bool] | None = None          # module keys kept in float32 whatever the dtype
    config_key: str | None = None                           # the config.json field holding this config
    config_beside_file: bool = False                        # a single file may have its config.json beside it
    check: Callable[[list[str], str], None] | None = None   # early "is this the right component" check
    quantize: Callable[[str, tuple[int, ...]], str] | None = None  # module key, shape -> role; None: no formats
    blocks: str | None = None                               # attribute path of the blocks (block swap)

    @property
    def dtypes(self) -> list[str]:
        """The loader's dtype choices: those it can run."""
        choices = ["auto", "bf16", "fp32"] + ([] if self.fp16_reason else ["fp16"])
        return choices + ([FP8_CHOICE] if self.quantize is not None else [])


def config_to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(config_type: type, data: dict) -> Any:
    """The dataclass back from ``config_to_json`` (lists become tuples where the field is a tuple)."""
    return config_type(**known_fields(config_type, data))


def config_from_files(spec: ComponentSpec, source: str) -> Any | None:
    """The component's config from a ``config.json``: the folder's, or (``config_beside_file``) the one beside a
    single file; None when there is none."""
    folder_config = reading.config_or_none(source)
    if folder_config is None and spec.config_beside_file:
        folder_config = _config_beside(spec, source)
    if folder_config is None:
        return None
    if spec.config_key is not None:
        if spec.config_key not in folder_config:
            raise CheckpointError(f"{source}: its config.json has no {spec.config_key}; it is not the "
                                  f"{spec.subfolder} config of the release.")
        folder_config = folder_config[spec.config_key]
    return spec.config_from_dict(folder_config, source)


def _config_beside(spec: ComponentSpec, source: str) -> dict | None:
    """The raw ``config.json`` beside a single file (for a ``config_key``, only one that has it), or None."""
    if not os.path.isfile(source):
        return None
    beside = os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")
    if not os.path.isfile(beside):
        return None
    raw = reading.read_json(beside)
    return raw if spec.config_key is None or spec.config_key in raw else None


def config_from_checkpoint(spec: ComponentSpec, source: str, checkpoint: Checkpoint) -> Any:
    """The config a converted file embeds, else one from the tensor shapes, else (when the shapes cannot give
    it, e.g. a head size they do not show) the ``config.json`` beside the file, as that error asks."""
    embedded = checkpoint.config
    if embedded is not None:
        return config_from_json(spec.config_type, embedded)
    try:
        return spec.config_from_shapes(checkpoint.shapes, source)
    except reading.ConfigNotInferable as e:
        raw = _config_beside(spec, source)
        if raw is None:
            raise type(e)(f"{e} The file: {describe(checkpoint)}.") from e
        return spec.config_from_dict(raw[spec.config_key] if spec.config_key else raw, source)
    except CheckpointError as e:  # not this component's tensors: say what the file holds
        raise CheckpointError(f"{e} The file: {describe(checkpoint)}.") from e


def resolve_config(spec: ComponentSpec, source: str, checkpoint: Checkpoint) -> Any:
    """``config_from_files``, else ``config_from_checkpoint``."""
    config = config_from_files(spec, source)
    return config if config is not None else config_from_checkpoint(spec, source, checkpoint)


def check_architecture(spec: ComponentSpec, checkpoint: Checkpoint) -> None:
    """Refuse a file the pack tagged as another component. Other tools' tags (city96's ``general.architecture``
    comes from its own model list) say nothing about the pack's components: the keys and shapes decide."""
    found = checkpoint.metadata.get(META_ARCH)
    if found is not None and found != spec.architecture:
        raise CheckpointError(f"{checkpoint.source} holds a {found!r} model ({checkpoint.format_name}), not "
                              f"{spec.architecture!r} ({spec.name}). Choose the loader of that component, or the "
                              f"file converted from this one. The file: {describe(checkpoint)}.")


def quantize_at_load(spec: ComponentSpec, placement: Placement, checkpoint: Checkpoint) -> bool:
    """Whether the ``fp8_e4m3fn`` choice quantizes this checkpoint's weights while loading (refused where the
    component has no FP8 form or the file is quantized already)."""
    if not placement.fp8:
        return False
    if spec.quantize is None:
        raise CheckpointError(f"{spec.name} has no FP8 form: choose {', '.join(spec.dtypes)}.")
    if checkpoint.kind == "gguf":
        raise CheckpointError(f"{checkpoint.source} is already quantized ({checkpoint.format_name}); fp8_e4m3fn "
                              f"quantizes bf16/fp32 weights while loading. Choose auto, bf16 or fp32: the compute "
                              f"dtype the GGUF weights are dequantized to; or make an FP8 file of it: "
                              f"{convert_command(checkpoint.source, FP8_CHOICE)}. The file: {describe(checkpoint)}.")
    return checkpoint.kind == "safetensors"


def check_state(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str,
                checkpoint: Checkpoint | None = None) -> None:
    about = f" The file: {describe(checkpoint)}." if checkpoint is not None else ""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{what} keys ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts) +
                              ". Check that this file is the right component of the release, and choose the "
                              "loader of the component it holds." + about)
    for key, shape in shapes.items():
        if shape != own[key]:
            raise CheckpointError(f"{source}: tensor {key} has shape {shape} but the config expects {own[key]}. The "
                                  f"config and the weights disagree (or the file belongs to another model); a "
                                  f"single file reads the config.json beside it: put the release's one there.{about}")


def fill(model: nn.Module, tensors: dict[str, torch.Tensor | Packed], *, spec: ComponentSpec,
         dtype: torch.dtype, device: torch.device, quantize_fp8: bool, source: str = "") -> nn.Module:
    """Assign every tensor into the meta-built ``model``; Linear/Embedding of components with formats become
    the pack's layers (so they accept packed weights and patches)."""
    formats = spec.quantize is not None
    for prefix, module in model.named_modules():
        layer = adopt(module, dtype) if formats else None
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{prefix}.{name}" if prefix else name
            if key not in tensors:
                continue  # a non-persistent buffer
            value = tensors[key]
            check_float(value, getattr(module, name), key, spec, source)
            if layer is not None and name == "weight":
                if (quantize_fp8 and isinstance(value, torch.Tensor) and isinstance(module, nn.Linear)
                        and spec.quantize(key, tuple(value.shape)) in (LINEAR, MODULATION)):
                    q, scale = fp8.quantize(value, "channel")
                    value = Packed(q, "fp8", tuple(value.shape), scale)
                layer.assign_weight(value, device)
                continue
            if isinstance(value, Packed):  # a packed tensor outside the pack's layers: unpack once
                value = dequantize_packed(value.data, value.kind, value.shape, value.scale, dtype)
            target = torch.float32 if (spec.keep_fp32 and spec.keep_fp32(key)) else dtype
            if value.is_floating_point():
                value = value.to(device=device, dtype=target)
            else:
                value = value.to(device=device)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[name] = value
    return model.eval().requires_grad_(False)


def check_float(value: torch.Tensor | Packed, target: torch.Tensor, key: str, spec: ComponentSpec,
                source: str) -> None:
    """Refuse an integer (or bool) tensor where the model has a float one: a cast would make it garbage."""
    if isinstance(value, Packed) or not target.is_floating_point() or value.is_floating_point():
        return
    raise CheckpointError(f"{source}: tensor {key} is stored as {str(value.dtype).removeprefix('torch.')}, but "
                          f"{spec.name} needs floating-point weights there; the file is not a float checkpoint of "
                          f"this component (or was quantized by a tool the pack does not read). Load the release's "
                          f"own safetensors, or a file convert.py made from them.")


def load_component(spec: ComponentSpec, path: str, dtype: str = "auto", device: torch.device | str | None = None,
                   *, compute_device: torch.device | str | None = None, config: Any = None,
                   checkpoint: Checkpoint | None = None) -> nn.Module:
    """Load ``spec``'s component from ``path`` (release root, component folder, ``.safetensors`` or ``.gguf``
    file) onto ``device`` (default: the compute device), to compute on ``compute_device`` (default: ``device``).
    ``dtype``: one of ``spec.dtypes``, resolved once against the compute device (``placement.place``); for FP8
    and GGUF files it is the compute dtype the weights are dequantized to. ``config``: a typed config that
    replaces the component's own; ``checkpoint``: tensors already read (a legacy ``.pt``)."""
    placement = place(dtype, device, compute_device, component=spec.name, fp16_reason=spec.fp16_reason)
    source = reading.component_path(path, spec.subfolder) if checkpoint is None else path
    config = config if config is not None else config_from_files(spec, source)
    checkpoint = prefixes.without_comfy_prefix(checkpoint or open_checkpoint(source), prefixes.role_of(spec.subfolder),
                                               log)
    check_architecture(spec, checkpoint)
    if spec.quantize is None and checkpoint.kind not in ("safetensors", "tensors"):
        raise CheckpointError(f"{source} is a {checkpoint.format_name} file, but {spec.name} is only read from "
                              f"plain safetensors. Use the release's own weights. The file: {describe(checkpoint)}.")
    quantize_fp8 = quantize_at_load(spec, placement, checkpoint)
    keys = list(checkpoint.shapes) + list(checkpoint.unavailable)
    if spec.check is not None:
        spec.check(keys, source)
    config = config if config is not None else config_from_checkpoint(spec, source, checkpoint)
    names = spec.key_map(keys, config)
    absent = sorted({checkpoint.unavailable[k] for k in names if k in checkpoint.unavailable})
    if absent:
        raise CheckpointError(f"{source}: the index lists shards that are missing and hold weights of "
                              f"{spec.name}: {', '.join(absent)}. Download them too.")
    with reading.meta_device():
        model = spec.build(config)
    check_state(model, {module_key: checkpoint.shapes[key] for key, module_key in names.items()}, source, checkpoint)
    model = fill(model, checkpoint.load(names), spec=spec, dtype=placement.dtype, device=placement.weights,
                 quantize_fp8=quantize_fp8, source=source)
    if (checkpoint.kind == "fp8" or quantize_fp8) and not fp8.has_fp8_matmul(placement.compute):
        fp8.note_fallback(placement.compute, placement.dtype)
    log.info("%s: %s from %s, computing in %s", spec.name, "FP8 (quantized at load)" if quantize_fp8
             else checkpoint.format_name, source, str(placement.dtype).removeprefix("torch."))
    return model
