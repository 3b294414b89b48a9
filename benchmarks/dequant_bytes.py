"""Bytes read + written per AR decode token for each weight format, the float32 route against the direct one.

Counted, not timed: every aten op a packed ``Linear`` dispatches for one token (``[1, in]`` bf16 activations) is
charged the bytes of its tensor inputs (read) and outputs (written); views move nothing. Per weight of a
``[512, 1024]`` layer, times the AR's Linear weights (the release's shapes, built on the meta device) gives
bytes per token. "float32 route": what the pack did before (``q.float() * scale`` / ``ggml.dequantize`` to
float32, then the compute dtype); "direct": ``layers.dequantize_packed`` off CUDA (``core/formats/direct_dequant.py``);
"fused (CUDA)": ``layers.dequantize_packed`` under kernel mode ``fused``, the one-pass kernels' path
(``core/cuda/dequant.py``): its custom op (``glm_image_nodes::dequant_*``, run here by its CPU reference) is
charged as one op, its packed input read once and its compute-dtype weight written once, as the kernel does.

Not a script of its own: ``python benchmarks/memory.py --bytes-per-token`` prints its table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from glm_image_nodes.core.formats import fp8, ggml, reading
from glm_image_nodes.core.formats.layers import dequantize_packed
from torch.utils._python_dispatch import TorchDispatchMode

FORMATS = ("bf16", "fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
SHAPE = (512, 1024)
ROUTES = ("float32 route", "direct", "fused (CUDA)")


class ByteCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.bytes += sum(a.numel() * a.element_size() for a in inputs)
        self.bytes += sum(o.numel() * o.element_size() for o in outputs)  # in place: read, then written
        return out


def _float32_route(data, kind, shape, scale, dtype):
    if kind == "fp8":
        return (data.float() * scale.float()).to(dtype)
    return ggml.dequantize(data, ggml.QTYPES[kind], shape).to(dtype)


def _packed(fmt: str, weight: torch.Tensor):
    if fmt == "fp8_e4m3fn":
        q, scale = fp8.quantize(weight, "channel")
        return q, "fp8", scale
    qtype = ggml.QTYPES[fmt.upper()]
    return ggml.quantize(weight, qtype), qtype.name, None


def bytes_per_weight(fmt: str, dtype=torch.bfloat16) -> dict:
    weight = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(1, SHAPE[1]).to(dtype)
    routes = {}
    if fmt == "bf16":
        w = weight.to(dtype)
        fns = dict.fromkeys(ROUTES, lambda: F.linear(x, w))
    else:
        data, kind, scale = _packed(fmt, weight)
        fns = {"float32 route": lambda: F.linear(x, _float32_route(data, kind, SHAPE, scale, dtype)),
               "direct": lambda: F.linear(x, dequantize_packed(data, kind, SHAPE, scale, dtype, "reference")),
               "fused (CUDA)": lambda: F.linear(x, dequantize_packed(data, kind, SHAPE, scale, dtype, "fused"))}
    for name, fn in fns.items():
        with ByteCounter() as counter:
            fn()
        routes[name] = counter.bytes / weight.numel()
    return routes


def ar_linear_weights(config_path: str) -> int:
    from glm_image_nodes.core.models import glm_ar
    raw = reading.read_json(config_path)
    spec = glm_ar.SPEC
    config = spec.config_from_dict(raw[spec.config_key] if spec.config_key else raw, config_path)
    with torch.device("meta"):
        model = spec.build(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def table(config_path: str) -> tuple[list[dict], str]:
    count = ar_linear_weights(config_path)
    rows = []
    for fmt in FORMATS:
        per = bytes_per_weight(fmt)
        rows.append({"format": fmt, **{f"{k} bytes/weight": v for k, v in per.items()},
                     **{f"{k} GB/token": v * count / 1e9 for k, v in per.items()}})
    bf16 = rows[0]["direct GB/token"]
    lines = [f"AR Linear weights: {count / 1e9:.2f} B; bytes read + written per decode token (batch 1)", "",
             "| format | float32 route GB/token | direct GB/token | direct / bf16 | fused (CUDA) GB/token "
             "| fused / bf16 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['float32 route GB/token']:.1f} | {r['direct GB/token']:.1f} | "
                     f"{r['direct GB/token'] / bf16:.2f} | {r['fused (CUDA) GB/token']:.1f} | "
                     f"{r['fused (CUDA) GB/token'] / bf16:.2f} |")
    return rows, "\n".join(lines)
