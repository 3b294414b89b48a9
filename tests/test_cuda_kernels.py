"""The Triton kernels against their torch references, without a GPU.

Interpreter (CPU tensors): fp32 to rounding-level tolerances, bf16 computed in fp32 with round-to-nearest-even
stores and intermediate roundings: bit-equal to the reference except where a reduction's fp32 sum order
moves a value by one bf16 ulp (norms), which must stay rare. sm_90a: every launch the model makes at the real
widths compiles for Hopper, and ptxas reports no register spills. Skipped where triton is not installed.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glm_image_nodes.core.cuda import activations, adaln, decode_attention, dequant, dispatch, norms, rope  # noqa: E402
from glm_image_nodes.core.formats import fp8, fused_dequant, ggml  # noqa: E402
from triton_harness import compile_sm90, interpreted, ptxas_report, recorded_launches  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
FP32_TOL = 2e-5
BF16_ULP_FRACTION = 0.02  # at most 2% of bf16 outputs one ulp off (reduction order), none more


@pytest.fixture
def interpret(monkeypatch):
    interpreted(monkeypatch)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_matches(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if got.dtype == torch.float32:
        err = (got - want).abs().max().item()
        assert err <= FP32_TOL * max(1.0, want.abs().max().item()), err
        return
    diff = (got.float() - want.float()).abs()
    ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7  # one bf16 ulp (8 significant bits) or less
    assert (diff <= ulp).all(), diff.max().item()
    assert (diff > 0).float().mean().item() <= BF16_ULP_FRACTION


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norms(interpret, dtype):
    x, branch = randn(5, 3, 96, dtype=dtype, seed=1), randn(5, 3, 96, dtype=dtype, seed=2, scale=30)
    w1, w2 = randn(96, dtype=dtype, seed=3), randn(96, dtype=dtype, seed=4)
    assert_matches(norms.rms_norm_triton(x, w1, 1e-5), norms.rms_norm_reference(x, w1, 1e-5))
    got = norms.add_rms_norm_triton(x, branch, w1, w2, 1e-5)
    want = norms.add_rms_norm_reference(x, branch, w1, w2, 1e-5)
    for g, w in zip(got, want):
        assert_matches(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(interpret, dtype):
    x = randn(4, 1, 2 * 1100, dtype=dtype, seed=5, scale=3)  # two column blocks, the second one partial
    assert_matches(activations.silu_mul_triton(x), activations.silu_mul_reference(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_layernorm_rope(interpret, dtype):
    b, s, heads, d, n_text = 2, 7, 3, 32, 2
    t = randn(b, s, heads * d, dtype=dtype, seed=11, scale=4).unflatten(2, (heads, d))
    freqs = randn(s - n_text, d // 2, seed=12)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    got = rope.qk_layernorm_rope_triton(t, cos, sin, n_text)
    assert got.is_contiguous() and got.shape == (b, heads, s, d)
    assert_matches(got, rope.qk_layernorm_rope_reference(t, cos, sin, n_text).contiguous())


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_epilogues(interpret, dtype):
    b, s, d = 2, 5, 80
    x, branch = randn(b, s, d, dtype=dtype, seed=13, scale=5), randn(b, s, d, dtype=dtype, seed=14)
    modulation = randn(b, 12 * d, dtype=dtype, seed=15).chunk(12, dim=1)  # views, as the adaLN Linear gives
    gate, scale, shift = (m.unsqueeze(1) for m in modulation[:3])
    assert_matches(adaln.layernorm_modulate_triton(x, scale, shift),
                   adaln.layernorm_modulate_reference(x, scale, shift))
    assert torch.equal(adaln.gated_residual_triton(x, branch, gate), adaln.gated_residual_reference(x, branch, gate))
    got = adaln.gated_residual_layernorm_modulate_triton(x, branch, gate, scale, shift)
    want = adaln.gated_residual_layernorm_modulate_reference(x, branch, gate, scale, shift)
    assert torch.equal(got[0], want[0])
    assert_matches(got[1], want[1])


def decode_inputs(dtype, b=2, heads=8, kv_heads=2, d=32, rotary=16, length=40):
    q, k, v = (randn(b, 1, h * d, dtype=dtype, seed=s) for s, h in ((16, heads), (17, kv_heads), (18, kv_heads)))
    angles = randn(b, 1, 1, rotary // 2, seed=19)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    caches = randn(b, kv_heads, length, d, dtype=dtype, seed=20), randn(b, kv_heads, length, d, dtype=dtype, seed=21)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :5] = False  # left padding of the second prompt
    return q, k, v, cos, sin, caches, valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,index", [(40, 0), (40, 17), (200, 199), (200, 70)])
def test_decode_attention(interpret, monkeypatch, dtype, length, index):
    """RoPE of q and the new k, the cache write at ``index`` and attention over the cache, split over programs
    (some of them past the current slot)."""
    monkeypatch.setattr(decode_attention, "TARGET_PROGRAMS", 8)
    q, k, v, cos, sin, caches, valid = decode_inputs(dtype, length=length)
    mine = [c.clone() for c in caches]
    idx = torch.tensor(index)
    got = decode_attention.decode_attention_triton(q, k, v, cos, sin, *mine, valid, idx, 32 ** -0.5)
    want = decode_attention.decode_attention_reference(q, k, v, cos, sin, *caches, valid, idx, 32 ** -0.5)
    for g, w in zip(mine, caches):
        assert torch.equal(g, w)  # the new slot rounded like the reference, every other slot untouched
    # fp32 reference attention over the same (rounded) cache, to compare the kernel's fp32 softmax with
    q_rot = rope.rope_kv_write_reference(q, k, v, cos, sin, *[c.clone() for c in caches], idx)
    exact = decode_attention.F.scaled_dot_product_attention(
        q_rot.float(), *(c.float().repeat_interleave(4, 1) for c in caches),
        attn_mask=decode_attention.decode_mask(valid, idx), scale=32 ** -0.5).transpose(1, 2).reshape(2, 1, -1)
    tol = FP32_TOL if dtype == torch.float32 else 2 ** -7  # bf16: one rounding of an fp32-exact result
    assert got.shape == want.shape == (2, 1, 8 * 32) and got.dtype == dtype
    assert (got.float() - exact).abs().max().item() <= tol * max(1.0, exact.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_dequantization(interpret, dtype):
    """Every e4m3fn bit pattern but NaN (per-row scales, a partial column block), real per-tensor-scaled e4m3fn
    and unscaled e5m2 weights: bit-equal to the float32 route ``(q.float() * scale).to(dtype)``."""
    q_bytes, _, scale, _ = fused_dequant.sample_fp8("cpu", dtype)
    weight = randn(8, 1100, seed=22, scale=0.05)
    q_tensor, tensor_scale = fp8.quantize(weight, "tensor")
    q5 = (weight * 100).clamp(-50_000, 50_000).to(torch.float8_e5m2)
    for q, scale in ((q_bytes.view(torch.float8_e4m3fn), scale), (q_tensor, tensor_scale), (q5, torch.tensor(1.0))):
        got = dequant.fp8_triton(q.view(torch.uint8), q.dtype == torch.float8_e5m2, scale, dtype)
        assert got.dtype == dtype and torch.equal(got, (q.float() * scale).to(dtype)), q.dtype
    nan = dequant.fp8_triton(torch.tensor([[0x7F, 0xFF, 0x7E]], dtype=torch.uint8), False, torch.tensor(2.0), dtype)
    assert nan[0, :2].isnan().all() and nan[0, 2].item() == 896.0  # e4m3fn's NaNs; its largest value, scaled


@pytest.mark.parametrize("kind", fused_dequant.GGUF_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_dequantization(interpret, kind, dtype):
    """Random block bytes (every quant and scale bit pattern, finite float16 scales; a partial last program) and
    a weight the pack's quantizer packed: bit-equal to ``ggml.dequantize`` (gguf-py's values) cast once."""
    qtype = ggml.QTYPES[kind]
    blocks, _, _ = fused_dequant.sample_gguf(kind, "cpu", dtype, n=37 if qtype.block_size == 32 else 5)
    packed = ggml.quantize(randn(3, 512, seed=23, scale=0.05), qtype) if kind in ("Q4_K", "Q5_K", "Q6_K") else None
    for data in (blocks, packed) if packed is not None else (blocks,):
        data = data.reshape(-1, qtype.type_size)
        want = ggml.dequantize(data, qtype, (data.shape[0], qtype.block_size)).to(dtype)
        got = dequant.gguf_triton(data, kind, dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_dequantization_custom_ops_pass_opcheck():
    torch.library.opcheck(fused_dequant.FP8_OP, fused_dequant.sample_fp8("cpu", torch.bfloat16))
    for kind in ("Q8_0", "Q4_K"):
        torch.library.opcheck(fused_dequant.GGUF_OP, fused_dequant.sample_gguf(kind, "cpu", torch.float32))


def test_custom_ops_pass_opcheck():
    x, w = randn(2, 3, 32), randn(32)
    q, k, v, cos, sin, caches, valid = decode_inputs(torch.float32)
    mod = randn(2, 1, 32)
    cases = {
        "rms_norm": (x, w, 1e-5), "add_rms_norm": (x, x * 2, w, w, 1e-5), "silu_mul": (x,),
        "decode_attention": (q, k, v, cos, sin, *caches, valid, torch.tensor(3), 0.25),
        "qk_layernorm_rope": (randn(2, 5, 2, 16), torch.ones(3, 16), torch.zeros(3, 16), 2),
        "layernorm_modulate": (x, mod, mod), "gated_residual": (x, x, mod),
        "gated_residual_layernorm_modulate": (x, x, mod, mod, mod),
    }
    assert set(cases) == set(dispatch.OPS)
    for name, args in cases.items():
        torch.library.opcheck(dispatch.OPS[name], args)


def _launches(monkeypatch):
    """Every launch at the real widths: AR hidden 4096, MLP 13696, 32/2 heads of 128 over a 2.5k cache; DiT
    hidden 4096, 32 heads, 4096 image + 16 glyph tokens; fp32 and bf16."""
    meta = dict(device="meta")
    out = []
    for dtype in DTYPES:
        t = dict(meta, dtype=dtype)
        x, w = torch.empty(1, 1, 4096, **t), torch.empty(4096, **t)
        out += recorded_launches(monkeypatch, norms, norms.rms_norm_triton, x, w, 1e-5)
        out += recorded_launches(monkeypatch, norms, norms.add_rms_norm_triton, x, x, w, w, 1e-5)
        out += recorded_launches(monkeypatch, activations, activations.silu_mul_triton, torch.empty(1, 1, 27392, **t))
        q, kv = torch.empty(1, 1, 4096, **t), torch.empty(1, 1, 256, **t)
        cos = torch.empty(1, 1, 1, 64, **t)
        cache = torch.empty(1, 2, 2560, 128, **t)
        out += recorded_launches(monkeypatch, decode_attention, decode_attention.decode_attention_triton,
                                 q, kv, kv, cos, cos, cache, cache, torch.empty(1, 2560, dtype=torch.bool, **meta),
                                 torch.empty((), dtype=torch.long, **meta), 128 ** -0.5)
        freqs = torch.empty(4096, 128, dtype=torch.float32, **meta)
        out += recorded_launches(monkeypatch, rope, rope.qk_layernorm_rope_triton,
                                 torch.empty(2, 4112, 32, 128, **t), freqs, freqs, 16)
        h, mod = torch.empty(2, 4096, 4096, **t), torch.empty(2, 12 * 4096, **t)[:, :4096].unsqueeze(1)
        out += recorded_launches(monkeypatch, adaln, adaln.layernorm_modulate_triton, h, mod, mod)
        out += recorded_launches(monkeypatch, adaln, adaln.gated_residual_triton, h, h, mod)
        out += recorded_launches(monkeypatch, adaln, adaln.gated_residual_layernorm_modulate_triton, h, h, mod, mod,
                                 mod)
        scale = torch.empty(27392, 1, dtype=torch.float32, **meta)  # gate_up_proj [2 * 13696, 4096]
        for q_dtype in fused_dequant.FP8_DTYPES:
            out += recorded_launches(monkeypatch, dequant, dequant.fp8_triton,
                                     torch.empty(27392, 4096, dtype=torch.uint8, **meta),
                                     q_dtype == torch.float8_e5m2, scale, dtype)
        for kind, (_, type_size, values) in dequant.GGUF_KINDS.items():
            out += recorded_launches(monkeypatch, dequant, dequant.gguf_triton,
                                     torch.empty(27392 * 4096 // values, type_size, dtype=torch.uint8, **meta), kind,
                                     dtype)
    return out


def test_every_kernel_compiles_for_sm90a_without_spills(monkeypatch):
    launches = _launches(monkeypatch)
    kernels = {launch.kernel.__name__ for launch in launches}
    assert kernels == {"rms_norm_kernel", "add_rms_norm_kernel", "silu_mul_kernel", "decode_partial_kernel",
                       "decode_merge_kernel", "qk_layernorm_rope_kernel", "adaln_kernel", "fp8_kernel",
                       "gguf_kernel"}
    for launch in launches:
        report = ptxas_report(compile_sm90(launch))
        assert report["spill_bytes"] == 0, (launch.kernel.__name__, launch.kwargs, report["log"])
        assert report["registers"] <= 255
