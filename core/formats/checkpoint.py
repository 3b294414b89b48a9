"""One view over the checkpoint files a loader may be given: plain safetensors (a file, or a component folder
with shards and an index), ComfyUI-style scaled-FP8 safetensors, and GGUF files (city96 style).

Every tensor stays memory-mapped from its file: safetensors through ``safe_open`` (file-backed storage), GGUF
through ``gguf.GGUFReader``'s ``numpy.memmap``. Nothing is read before a loader asks for a key, and only the
shards holding wanted keys are opened.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import fp8, ggml, reading
from .layers import Packed
from .reading import CheckpointError

META_CONFIG = "glm_image_nodes.config"              # the component's config.json, as JSON
META_ARCH = "glm_image_nodes.architecture"          # which component (ComponentSpec.architecture)
META_FORMAT = "glm_image_nodes.format"              # what convert.py wrote: fp8_e4m3fn, q4_k, ...
GGUF_ARCH = "general.architecture"
ORIG_SHAPE = "comfy.gguf.orig_shape."                # city96: the shape a reshaped tensor had


@dataclass
class Checkpoint:
    """Keys, logical shapes and metadata of a checkpoint; ``load`` reads (maps) the tensors asked for."""
    source: str
    kind: str                                    # "safetensors", "fp8", "gguf" or "tensors" (a .pt)
    shapes: Mapping[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # key -> its shard, listed by the index, not on disk
    _files: dict[str, str] = field(default_factory=dict)      # key -> safetensors file
    _gguf: dict = field(default_factory=dict)                  # key -> (kind, data, shape)
    _tensors: dict = field(default_factory=dict)               # key -> tensor, for tensors already in memory
    stored: dict[str, int] = field(default_factory=dict)       # stored dtype / GGML type -> tensor count
    fp8_scaled: bool = True                                    # FP8 weights come with scales (else scale 1)
    comfy_prefix: str = ""                                     # the ComfyUI key prefix taken off (prefixes.py)

    @classmethod
    def of_tensors(cls, source: str, tensors: dict[str, torch.Tensor]) -> "Checkpoint":
        """Tensors read by other means (a legacy ``.pt`` with ``weights_only=True``)."""
        return cls(source, "tensors", {k: tuple(v.shape) for k, v in tensors.items()}, _tensors=dict(tensors))

    @property
    def config(self) -> dict | None:
        raw = self.metadata.get(META_CONFIG)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.source}: the embedded config ({META_CONFIG}) is not valid JSON ({e}); "
                                  f"convert the file again.") from e

    @property
    def architecture(self) -> str | None:
        return self.metadata.get(META_ARCH) or self.metadata.get(GGUF_ARCH)

    @property
    def format_name(self) -> str:
        if self.kind == "gguf":
            kinds = sorted({kind for kind, _, _ in self._gguf.values()} - set(ggml.FLOAT_TYPES))
            return "GGUF " + ("/".join(kinds) if kinds else "float")
        if self.kind == "fp8":
            return "FP8 (e4m3fn, scaled)" if self.fp8_scaled else "FP8 (e4m3fn, unscaled)"
        return {"safetensors": "safetensors", "tensors": "PyTorch"}[self.kind]

    def load(self, names: dict[str, str]) -> dict[str, torch.Tensor | Packed]:
        """``{checkpoint key: module key}`` -> ``{module key: tensor or Packed}``, all memory-mapped."""
        if self.kind == "gguf":
            return {module_key: self._gguf_tensor(key) for key, module_key in names.items()}
        if self.kind == "tensors":
            return {module_key: self._tensors[key] for key, module_key in names.items()}
        by_file: dict[str, list[str]] = {}
        for key in names:
            by_file.setdefault(self._files[key], []).append(key)
        out: dict[str, torch.Tensor | Packed] = {}
        for file, keys in by_file.items():
            with reading.open_safetensors(file) as sf:
                available = set(sf.keys())
                for key in keys:
                    stored = self.comfy_prefix + key  # the name in the file
                    tensor = sf.get_tensor(stored)
                    if tensor.dtype == fp8.FP8:
                        scale = self._fp8_scale(stored, sf, available)
                        out[names[key]] = Packed(tensor, "fp8", tuple(tensor.shape), scale)
                    else:
                        out[names[key]] = tensor
        return out

    def _fp8_scale(self, key: str, sf, available: set[str]) -> torch.Tensor:
        """The weight's scale; 1 for a plain cast (kijai-style ``*_fp8_e4m3fn`` files carry no scales)."""
        stem = key.rsplit(".", 1)[0]
        for name in fp8.SCALE_KEYS:
            if f"{stem}.{name}" in available:
                return sf.get_tensor(f"{stem}.{name}").float()
        return torch.ones((), dtype=torch.float32)

    def _gguf_tensor(self, key: str) -> torch.Tensor | Packed:
        kind, data, shape = self._gguf[key]
        if kind in ggml.FLOAT_TYPES:
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
            return data.reshape(-1).view(torch.uint8).view(dtype).reshape(shape)
        return Packed(data, kind, shape)


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def open_checkpoint(source: str) -> Checkpoint:
    """The checkpoint at ``source``: a ``.gguf`` file, a ``.safetensors`` file or a component folder."""
    if os.path.isfile(source) and is_gguf(source):
        return _open_gguf(source)
    if os.path.isdir(source):
        ggufs = sorted(n for n in os.listdir(source) if is_gguf(n))
        if ggufs and not any(n.endswith(".safetensors") for n in os.listdir(source)):
            if len(ggufs) > 1:
                raise CheckpointError(f"{source} holds several GGUF files ({', '.join(ggufs)}); choose one of them.")
            return _open_gguf(os.path.join(source, ggufs[0]))
    return _open_safetensors(source)


class _IndexedShapes(Mapping):
    """Shapes of an indexed (sharded) folder: keys from the index, each shard's header read when one of its
    keys is first looked at, so shards holding no wanted key are never opened."""

    def __init__(self, key_file: dict[str, str]):
        self._key_file = key_file
        self._known: dict[str, tuple[int, ...]] = {}

    def __getitem__(self, key: str) -> tuple[int, ...]:
        if key not in self._known:
            with reading.open_safetensors(self._key_file[key]) as sf:
                for k in sf.keys():
                    self._known[k] = tuple(sf.get_slice(k).get_shape())
        return self._known[key]

    def __iter__(self):
        return iter(self._key_file)

    def __len__(self) -> int:
        return len(self._key_file)

    def __contains__(self, key) -> bool:
        return key in self._key_file


def _is_format_key(key: str) -> bool:
    return key == fp8.MARKER or key.rsplit(".", 1)[-1] in (*fp8.SCALE_KEYS, fp8.INPUT_SCALE)


def _open_safetensors(source: str) -> Checkpoint:
    files, unavailable = _key_files(source)
    if all(keys is not None for keys in files.values()):  # an index names every key
        key_file = {k: f for f, keys in files.items() for k in keys if not _is_format_key(k)}
        scaled = any(_is_format_key(k) for keys in files.values() for k in keys)
        return Checkpoint(source, "fp8" if scaled else "safetensors", _IndexedShapes(key_file), {}, unavailable,
                          key_file)
    shapes, metadata, key_file, stored = {}, {}, {}, {}
    has_fp8, has_scales = False, False
    for file in files:
        with reading.open_safetensors(file) as sf:
            metadata.update(sf.metadata() or {})
            for key in sf.keys():
                piece = sf.get_slice(key)
                has_fp8 = has_fp8 or piece.get_dtype() == "F8_E4M3"
                if _is_format_key(key):
                    has_scales = has_scales or key != fp8.MARKER
                    continue  # read with their weights
                stored[piece.get_dtype()] = stored.get(piece.get_dtype(), 0) + 1
                shapes[key] = tuple(piece.get_shape())
                key_file[key] = file
    return Checkpoint(source, "fp8" if has_fp8 else "safetensors", shapes, metadata, unavailable, key_file,
                      stored=stored, fp8_scaled=has_scales)


def _key_files(source: str) -> tuple[dict[str, list[str] | None], dict[str, str]]:
    """Each safetensors file of ``source`` with its keys (None: read them from the file's header), and the keys
    of shards an index lists but that are not on disk (a loader that wants one of them says so)."""
    if os.path.isdir(source):
        indexes = sorted(n for n in os.listdir(source) if n.endswith(reading.INDEX_SUFFIX))
        if indexes:
            weight_map = reading.read_json(os.path.join(source, indexes[0])).get("weight_map", {})
            by_file: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                by_file.setdefault(os.path.join(source, shard), []).append(key)
            present = {f: keys for f, keys in by_file.items() if os.path.isfile(f)}
            absent = {key: os.path.basename(f) for f, keys in by_file.items() if f not in present for key in keys}
            if not present:
                raise CheckpointError(f"{source}: none of the shards its index {indexes[0]} lists is on disk.")
            return present, absent
    return {f: None for f in reading.safetensors_files(source)}, {}


def _open_gguf(path: str) -> Checkpoint:
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError(f"{path} is a GGUF file; reading it needs the gguf package: pip install gguf==0.19.0 "
                              f"(it is in the pack's requirements.txt).") from e
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # ValueError for a bad magic, reshape errors for a file cut short
        raise CheckpointError(f"{path} cannot be read as GGUF ({type(e).__name__}: {e}). The file is incomplete "
                              f"or corrupt: download or convert it again.") from e
    metadata, orig_shapes = {}, {}
    for name, value in reader.fields.items():
        if value.types and value.types[0] == gguf.GGUFValueType.STRING:
            metadata[name] = value.contents()
        elif name.startswith(ORIG_SHAPE):  # city96: a tensor stored reshaped (GGUF keeps at most 4 dims)
            orig_shapes[name[len(ORIG_SHAPE):]] = tuple(int(v) for v in value.contents())
    tensors, shapes, stored = {}, {}, {}
    seen = sorted({t.tensor_type.name for t in reader.tensors})
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in ggml.QTYPES:
            raise CheckpointError(f"{path}: tensor {t.name} is stored as {kind}, which the pack does not read "
                                  f"(the file holds {', '.join(seen)}; architecture tag "
                                  f"{metadata.get(GGUF_ARCH)!r}). Supported GGUF types: {', '.join(ggml.QTYPES)}. "
                                  f"Make the file again from the original safetensors in one of them, e.g. "
                                  f"python convert.py ORIGINAL.safetensors --format q4_k --out "
                                  f"{os.path.basename(path)[:-5]}_q4_k.gguf (or llama-quantize with Q4_K_M, "
                                  f"Q3_K_S or IQ4_XS).")
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))
        expected = _nbytes(ggml.QTYPES[kind], shape)
        if t.data.nbytes != expected:
            raise CheckpointError(f"{path}: tensor {t.name} holds {t.data.nbytes} bytes, {expected} expected. The "
                                  f"file is incomplete or corrupt: download or convert it again.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)
        shape = _orig_shape(path, t.name, shape, orig_shapes.get(t.name))
        tensors[t.name] = (kind, data.view(torch.uint8) if kind not in ggml.FLOAT_TYPES else data, shape)
        shapes[t.name] = shape
        stored[kind] = stored.get(kind, 0) + 1
    return Checkpoint(path, "gguf", shapes, metadata, _gguf=tensors, stored=stored)


def _orig_shape(path: str, name: str, stored: tuple[int, ...], orig: tuple[int, ...] | None) -> tuple[int, ...]:
    if orig is None:
        return stored
    count = 1
    for d in stored:
        count *= d
    wanted = 1
    for d in orig:
        wanted *= d
    if count != wanted:
        raise CheckpointError(f"{path}: {ORIG_SHAPE}{name} says {orig} but the tensor holds {count} values "
                              f"({stored}); the file is inconsistent: convert it again.")
    return orig


def _nbytes(qtype: ggml.QType, shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * qtype.row_bytes(shape[-1] if shape else 1)
