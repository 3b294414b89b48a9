"""Writing converted checkpoints one tensor at a time, so a 9B model converts in a few GB of RAM: GGUF through
``gguf.GGUFWriter`` (tensor infos first, then the data streamed), safetensors with the format's own header
layout (the ``safetensors`` package writes only whole in-memory dicts)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from . import ggml

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Entry:
    """One tensor of the output: its name, how it is stored and how to make its bytes."""
    name: str
    shape: tuple[int, ...]
    kind: str                                   # a GGML type name (GGUF) or a torch dtype name (safetensors)
    nbytes: int
    make: Callable[[], torch.Tensor]            # the stored tensor (uint8 bytes for packed GGUF types)


def write_gguf(path: str, architecture: str, strings: dict[str, str], entries: list[Entry],
               progress: Callable[[Entry], None] = lambda e: None, *, file_type: str | None = None) -> None:
    """``file_type``: a ``gguf.LlamaFileType`` name (``general.file_type``, as city96's convert.py writes it)."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if file_type is not None:
        writer.add_file_type(gguf.LlamaFileType[file_type])
    for key, value in strings.items():
        writer.add_string(key, value)
    for e in entries:
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(ggml.QTYPES[e.kind].id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for e in entries:
        data = e.make().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != e.nbytes:
            raise AssertionError(f"{e.name}: {data.nbytes} bytes made, {e.nbytes} announced")
        writer.write_tensor_data(data)
        progress(e)
    writer.close()


def write_safetensors(path: str, entries: Iterable[Entry], metadata: dict[str, str],
                      progress: Callable[[Entry], None] = lambda e: None) -> None:
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.kind, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            tensor = e.make().contiguous()
            data = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
            if data.numel() != e.nbytes:
                raise AssertionError(f"{e.name}: {data.numel()} bytes made, {e.nbytes} announced")
            f.write(data.numpy().tobytes())
            progress(e)
