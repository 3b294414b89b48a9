"""Packed weights dequantized straight to the compute dtype give the float32 route's values bit for bit (FP8,
GGUF F16/BF16/Q8_0), while a bf16 scale would not (measured here: why the scale stays float32); and the
direct route moves fewer bytes per weight (benchmarks/dequant_bytes.py)."""
import os
import sys

import pytest
import torch
from glm_image_nodes.core.formats import direct_dequant, fp8, ggml
from glm_image_nodes.core.formats.layers import dequantize_packed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(seed=0, shape=(96, 256)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-3, 0, shape[0])[:, None]


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_direct_equals_the_float32_route(granularity, dtype):
    q, scale = fp8.quantize(_weight(), granularity)
    want = (q.float() * scale).to(dtype)
    got = fp8.dequantize(q, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    q5 = _weight(1).clamp(-50, 50).to(torch.float8_e5m2)  # unscaled e5m2 files: the cast is exact too
    assert torch.equal(fp8.dequantize(q5, torch.tensor(1.0), dtype), q5.float().to(dtype))


def test_a_bf16_scale_would_not_be_exact():
    q, scale = fp8.quantize(_weight(), "channel")
    want = (q.float() * scale).to(torch.bfloat16)
    differ = (q.to(torch.bfloat16) * scale.to(torch.bfloat16) != want).float().mean().item()
    assert differ > 0.05, differ  # ~21 % of the weights on this tensor


@pytest.mark.parametrize("kind", ["Q8_0", "F16", "BF16", "F32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_direct_equals_the_float32_route(kind, dtype):
    qtype = ggml.QTYPES[kind]
    data = ggml.quantize(_weight(2), qtype)
    shape = (96, 256)
    want = ggml.dequantize(data, qtype, shape).to(dtype)
    direct = direct_dequant.gguf_to(data, kind, shape, dtype)
    assert direct is not None and direct.dtype == dtype and torch.equal(direct, want)
    assert torch.equal(dequantize_packed(data, kind, shape, None, dtype), want)


def test_other_block_formats_keep_the_float32_route():
    data = ggml.quantize(_weight(3), ggml.QTYPES["Q4_0"])
    assert direct_dequant.gguf_to(data, "Q4_0", (96, 256), torch.bfloat16) is None


def test_direct_route_moves_fewer_bytes():
    import dequant_bytes
    bf16 = dequant_bytes.bytes_per_weight("bf16")
    assert bf16["direct"] == pytest.approx(2.0, rel=0.01)  # the GEMM reads the bf16 weight once
    for fmt, most in (("fp8_e4m3fn", 9.1), ("q8_0", 11.5)):
        routes = dequant_bytes.bytes_per_weight(fmt)
        assert routes["direct"] <= most < routes["float32 route"], (fmt, routes)
