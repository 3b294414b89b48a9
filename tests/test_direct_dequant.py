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


def test_fused_route_moves_the_packed_bytes_plus_one_weight_write_and_read():
    """The one-pass kernels' path (its custom op charged its real input and output): per weight, the packed
    bytes read once, the bf16 weight written once and read once by the GEMM (4 bytes), within 10 %."""
    import dequant_bytes
    for fmt in ("fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"):
        routes = dequant_bytes.bytes_per_weight(fmt)
        qtype = ggml.QTYPES.get(fmt.upper())
        packed = 1.0 if qtype is None else qtype.type_size / qtype.block_size
        assert 4 + packed <= routes["fused (CUDA)"] <= 1.1 * 4 + packed, (fmt, routes)
        assert routes["fused (CUDA)"] < routes["direct"], (fmt, routes)


@pytest.mark.parametrize("kind", ["fp8", "Q8_0", "Q4_K"])
def test_cpu_keeps_the_torch_route_and_the_forced_fused_op_gives_its_values(monkeypatch, kind):
    from glm_image_nodes.core.formats import fused_dequant
    if kind == "fp8":
        data, scale = fp8.quantize(_weight(4, (32, 256)), "channel")
    else:
        data, scale = ggml.quantize(_weight(4, (32, 256)), ggml.QTYPES[kind]), None
    calls = []
    real_fp8, real_gguf = fused_dequant._run_fp8, fused_dequant._run_gguf
    monkeypatch.setattr(fused_dequant, "_run_fp8", lambda *a: calls.append(1) or real_fp8(*a))
    monkeypatch.setattr(fused_dequant, "_run_gguf", lambda *a: calls.append(1) or real_gguf(*a))
    want = dequantize_packed(data, kind, (32, 256), scale, torch.bfloat16)  # auto: CPU runs the torch route
    assert calls == []
    got = dequantize_packed(data, kind, (32, 256), scale, torch.bfloat16, mode="fused")
    assert calls == [1] and torch.equal(got, want)
