"""Converting a component's bf16/fp32 safetensors into an FP8 safetensors file or a GGUF file that the loaders
(and, for GGUF, the ``gguf`` package) read back.

What each role becomes (``ComponentSpec.quantize`` gives the role of every tensor):

| role | fp8_e4m3fn | q8_0 .. q4_0 | f16 / bf16 |
|---|---|---|---|
| linear (attention, MLP) | FP8, a scale per layer (or channel) | the chosen type (K-quants: below) | that type |
| modulation (adaLN) | FP8 | Q8_0 | that type |
| embedding | source precision | Q8_0 | that type |
| keep (input/output projections, the AR's vision head) | source precision | source precision | source precision |
| 1-D (norms, biases) | source precision | F32 | F32 |

Rows that are not a multiple of 256 cannot be K-quantized: Q4_K falls back to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..formats import fp8, ggml, prefixes, reading
from ..formats.checkpoint import META_ARCH, META_CONFIG, META_FORMAT, open_checkpoint
from ..formats.layers import Packed, dequantize_packed
from ..formats.reading import CheckpointError
from ..formats.writers import ST_DTYPES, Entry, write_gguf, write_safetensors
from ..loading.components import (
    EMBEDDING,
    KEEP,
    LINEAR,
    MODULATION,
    ComponentSpec,
    check_state,
    config_to_json,
    resolve_config,
)

# general.file_type of each GGUF format (gguf.LlamaFileType; the K-quants use llama.cpp's "_M" names, whose
# mixes also keep some tensors in higher types, as these files do)
FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K", "q5_k": "MOSTLY_Q5_K_M", "q4_k": "MOSTLY_Q4_K_M",
              "q4_0": "MOSTLY_Q4_0", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
META_FP8_LAYOUT = "glm_image_nodes.fp8_layout"
CHANNEL_LAYOUT_NOTE = ("per-output-channel scale_weight [out, 1]: NOT ComfyUI's scaled-FP8 layout (ComfyUI's "
                       "scaled_fp8 ops need one scalar scale per layer and refuse this file); read by glm-image-nodes")
FORMATS = ("fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "f16", "bf16")
GGUF_SOURCE_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class Report:
    component: str
    out: str
    source_bytes: int = 0
    bytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)   # stored kind -> number of tensors


def extension(fmt: str) -> str:
    return ".safetensors" if fmt == "fp8_e4m3fn" else ".gguf"


def _gguf_kind(fmt: str, role: str, shape: tuple[int, ...], source_dtype: torch.dtype) -> str:
    if len(shape) < 2:
        return "F32"
    if fmt in ("f16", "bf16"):
        return fmt.upper()
    if role == KEEP:
        return GGUF_SOURCE_TYPES.get(source_dtype, "F32")
    name = "Q8_0" if role in (MODULATION, EMBEDDING) else fmt.upper()
    return ggml.qtype_for_row(name, shape[-1]).name


def _nbytes(kind: str, shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * ggml.QTYPES[kind].row_bytes(shape[-1] if shape else 1)


def stored_bytes(fmt: str, role: str, shape: tuple[int, ...], source_dtype: torch.dtype = torch.bfloat16,
                 fp8_scale: str = "tensor") -> int:
    """The bytes one tensor takes in a ``fmt`` file (the FP8 weight's scale included); ``fmt`` ``"source"``: as
    given. Used by convert_component and for the full-size figures (shapes only, nothing built)."""
    count = 1
    for d in shape:
        count *= d
    if fmt == "source":
        return count * torch.tensor([], dtype=source_dtype).element_size()
    if fmt == "fp8_e4m3fn":
        if role in (LINEAR, MODULATION) and len(shape) == 2:
            return count + 4 * (shape[0] if fp8_scale == "channel" else 1)
        return count * torch.tensor([], dtype=source_dtype).element_size()
    return _nbytes(_gguf_kind(fmt, role, shape, source_dtype), shape)


def convert_component(spec: ComponentSpec, path: str, fmt: str, out: str, *, fp8_scale: str = "tensor",
                      progress=None) -> Report:
    """Write ``spec``'s component found at ``path`` (release root, component folder or file) as ``fmt`` to
    ``out``. Tensors keep their checkpoint names; the file embeds the typed config and the component's tag.
    ``fp8_scale``: ``"tensor"`` (default) writes ComfyUI's scaled-FP8 layout (a scalar ``scale_weight`` per
    layer), ``"channel"`` one scale per output channel (more accurate; only this pack reads it, and the file's
    metadata says so)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if spec.quantize is None:
        raise ValueError(f"{spec.name} has no FP8/GGUF form; keep its safetensors.")
    source = reading.component_path(path, spec.subfolder)
    # any file the loaders read: plain, scaled or unscaled FP8, GGUF (packed weights are dequantized first),
    # with or without ComfyUI's key prefix
    checkpoint = prefixes.without_comfy_prefix(open_checkpoint(source), prefixes.role_of(spec.subfolder))
    keys = list(checkpoint.shapes)
    if spec.check is not None:
        spec.check(keys, source)
    config = resolve_config(spec, source, checkpoint)
    names = spec.key_map(keys, config)
    with reading.meta_device():
        model = spec.build(config)
    check_state(model, {m: checkpoint.shapes[k] for k, m in names.items()}, source, checkpoint)

    def tensor(key: str) -> torch.Tensor:
        value = checkpoint.load({key: key})[key]
        if isinstance(value, Packed):
            return dequantize_packed(value.data, value.kind, value.shape, value.scale, torch.float32)
        return value

    report = Report(spec.architecture, out)
    entries: list[Entry] = []
    for key, module_key in names.items():
        shape = checkpoint.shapes[key]
        role = spec.quantize(module_key, shape)
        original = checkpoint.load({key: key})[key]  # memory-mapped: only its header is read here
        if isinstance(original, torch.Tensor) and not original.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key} is stored as {str(original.dtype).removeprefix('torch.')}; "
                                  f"convert.py reads floating-point (or FP8 / GGUF) weights only. Convert the "
                                  f"release's own safetensors.")
        source_dtype = _source_dtype(original)
        report.source_bytes += original.nbytes
        if fmt == "fp8_e4m3fn":
            entries += _fp8_entries(key, shape, role, source_dtype, tensor, fp8_scale)
        else:
            kind = _gguf_kind(fmt, role, shape, source_dtype)
            entries.append(Entry(key, shape, kind, _nbytes(kind, shape),
                                 lambda key=key, kind=kind: ggml.quantize(tensor(key), ggml.QTYPES[kind])))
    for e in entries:
        report.kinds[e.kind] = report.kinds.get(e.kind, 0) + 1
        report.bytes += e.nbytes
    strings = {META_CONFIG: config_to_json(config), META_ARCH: spec.architecture, META_FORMAT: fmt}
    if fmt == "fp8_e4m3fn":
        strings[META_FP8_LAYOUT] = CHANNEL_LAYOUT_NOTE if fp8_scale == "channel" else "comfyui scaled_fp8 (per tensor)"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tick = progress or (lambda e: None)
    if fmt == "fp8_e4m3fn":
        marker = Entry(fp8.MARKER, (0,), "F8_E4M3", 0, lambda: torch.empty(0, dtype=fp8.FP8))
        write_safetensors(out, [marker, *entries], strings, tick)
    else:
        write_gguf(out, spec.architecture, strings, entries, tick, file_type=FILE_TYPES[fmt])
    return report


def _source_dtype(value: torch.Tensor | Packed) -> torch.dtype:
    """The dtype a kept tensor is written in: its own, bf16 for FP8 (exact), float32 for GGML-packed ones."""
    if isinstance(value, Packed):
        return torch.bfloat16 if value.kind == "fp8" else torch.float32
    return torch.bfloat16 if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else value.dtype


def _fp8_entries(key, shape, role, source_dtype, tensor, granularity) -> list[Entry]:
    if role not in (LINEAR, MODULATION) or len(shape) != 2:
        name = ST_DTYPES[source_dtype]
        size = torch.tensor([], dtype=source_dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        return [Entry(key, shape, name, count * size, lambda: tensor(key).to(source_dtype))]
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair():
        if "q" not in cache:
            cache["q"] = fp8.quantize(tensor(key), granularity)
        return cache["q"]

    def scale():
        value = pair()[1]
        cache.clear()
        return value

    stem = key.rsplit(".", 1)[0]
    scale_shape = () if granularity == "tensor" else (shape[0], 1)
    count = shape[0] if granularity == "channel" else 1
    return [Entry(key, shape, "F8_E4M3", shape[0] * shape[1], lambda: pair()[0]),
            Entry(f"{stem}.{fp8.SCALE}", scale_shape, "F32", 4 * count, scale)]


# ---- which component a path holds -------------------------------------------------------------------------
def specs_by_architecture() -> dict[str, ComponentSpec]:
    from ..models import cogview4_dit, glm_ar, glm_image_dit, glm_text_encoder, t5_encoder

    return {s.architecture: s for s in (glm_ar.SPEC, glm_image_dit.SPEC, t5_encoder.SPEC, cogview4_dit.SPEC,
                                        glm_text_encoder.SPEC)}


RELEASE_COMPONENTS = {"GlmImagePipeline": ("glm_image_ar", "glm_image_dit", "glyph_byt5"),
                      "CogView4Pipeline": ("cogview4_text_encoder", "cogview4_dit")}
SIGNATURES = (("model.language_model.layers.0.self_attn.q_proj.weight", "glm_image_ar"),
              ("prior_token_embedding.weight", "glm_image_dit"),
              ("patch_embed.text_proj.weight", "cogview4_dit"),
              ("encoder.block.0.layer.0.SelfAttention.q.weight", "glyph_byt5"),
              ("layers.0.self_attn.q_proj.weight", "cogview4_text_encoder"),
              ("model.layers.0.self_attn.q_proj.weight", "cogview4_text_encoder"))


def release_components(root: str) -> list[ComponentSpec]:
    """The convertible components of a release folder, from its ``model_index.json``."""
    index = reading.read_json(os.path.join(root, "model_index.json"))
    names = RELEASE_COMPONENTS.get(index.get("_class_name"))
    if names is None:
        raise CheckpointError(f"{root}: model_index.json names {index.get('_class_name')!r}; convert.py knows "
                              f"{', '.join(RELEASE_COMPONENTS)}.")
    specs = specs_by_architecture()
    return [specs[n] for n in names]


def detect_component(path: str) -> ComponentSpec:
    """The spec of the component in a folder or file, from its tensor names."""
    checkpoint = open_checkpoint(path)
    specs = specs_by_architecture()
    if checkpoint.metadata.get(META_ARCH) in specs:
        return specs[checkpoint.metadata[META_ARCH]]
    keys = set(checkpoint.shapes)
    keys |= {k[len(found[0]):] for k in keys if (found := prefixes.prefix_of(k))}  # ComfyUI-prefixed files
    for key, architecture in SIGNATURES:
        if key in keys:
            return specs_by_architecture()[architecture]
    raise CheckpointError(f"{path}: no GLM-Image or CogView4 component recognised from its tensor names (e.g. "
                          f"{', '.join(sorted(keys)[:3])}); pass --component.")
