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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_harness import compile_sm90, interpreted, ptxas_report, recorded_launches  # noqa: E402

from glm_image_nodes.core.cuda import activations, adaln, decode_attention, dispatch, norms, rope  # noqa: E402

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
@pytest.mark.parametrize("n", [1, 3])
def test_rope_kv_write(interpret, dtype, n):
    b, heads, kv_heads, d, rotary, length = 2, 4, 2, 32, 16, 10
    q, k, v = (randn(b, n, h * d, dtype=dtype, seed=s) for s, h in ((6, heads), (7, kv_heads), (8, kv_heads)))
    angles = randn(b, 1, n, rotary // 2, seed=9)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    index = torch.tensor(5)
    caches = [randn(b, kv_heads, length, d, dtype=dtype, seed=10) for _ in range(2)]
    mine = [c.clone() for c in caches]
    want = rope.rope_kv_write_reference(q, k, v, cos, sin, *caches, index)
    got = rope.rope_kv_write_triton(q, k, v, cos, sin, *mine, index)
    assert_matches(got, want)
    for g, w in zip(mine, caches):
        assert torch.equal(g, w)  # elementwise in the same order: bit-equal, other slots untouched


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
    assert_matches(adaln.layernorm_modulate_triton(x, scale, shift), adaln.layernorm_modulate_reference(x, scale, shift))
    assert torch.equal(adaln.gated_residual_triton(x, branch, gate), adaln.gated_residual_reference(x, branch, gate))
    got = adaln.gated_residual_layernorm_modulate_triton(x, branch, gate, scale, shift)
    want = adaln.gated_residual_layernorm_modulate_reference(x, branch, gate, scale, shift)
    assert torch.equal(got[0], want[0])
    assert_matches(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,index", [(40, 0), (40, 17), (200, 199), (200, 70)])
def test_decode_attention(interpret, monkeypatch, dtype, length, index):
    monkeypatch.setattr(decode_attention, "TARGET_PROGRAMS", 8)  # several splits, some past the current slot
    b, heads, kv_heads, d = 2, 8, 2, 16
    q = randn(b, heads, 1, d, dtype=dtype, seed=16)
    cache_k, cache_v = randn(b, kv_heads, length, d, dtype=dtype, seed=17), randn(b, kv_heads, length, d, dtype=dtype,
                                                                                     seed=18)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :5] = False  # left padding of the second prompt
    idx = torch.tensor(index)
    got = decode_attention.decode_attention_triton(q, cache_k, cache_v, valid, idx, d ** -0.5)
    want = decode_attention.decode_attention_reference(q.float(), cache_k.float(), cache_v.float(), valid, idx,
                                                        d ** -0.5)
    tol = FP32_TOL if dtype == torch.float32 else 2 ** -7  # bf16: one rounding of an fp32-exact result
    assert (got.float() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def test_custom_ops_pass_opcheck():
    x, w = randn(2, 3, 32), randn(32)
    q, k, v = randn(1, 1, 4 * 16), randn(1, 1, 2 * 16), randn(1, 1, 2 * 16)
    cos, sin = torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8)
    caches = randn(1, 2, 6, 16), randn(1, 2, 6, 16)
    mod = randn(2, 1, 32)
    cases = {
        "rms_norm": (x, w, 1e-5), "add_rms_norm": (x, x * 2, w, w, 1e-5), "silu_mul": (x,),
        "rope_kv_write": (q, k, v, cos, sin, *caches, torch.tensor(2)),
        "decode_attention": (randn(1, 4, 1, 16), *caches, torch.ones(1, 6, dtype=torch.bool), torch.tensor(3), 0.25),
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
        out += recorded_launches(monkeypatch, rope, rope.rope_kv_write_triton, q, kv, kv, cos, cos, cache, cache,
                                 torch.empty((), dtype=torch.long, **meta))
        out += recorded_launches(monkeypatch, decode_attention, decode_attention.decode_attention_triton,
                                 torch.empty(1, 32, 1, 128, **t), cache, cache,
                                 torch.empty(1, 2560, dtype=torch.bool, **meta),
                                 torch.empty((), dtype=torch.long, **meta), 128 ** -0.5)
        freqs = torch.empty(4096, 128, dtype=torch.float32, **meta)
        out += recorded_launches(monkeypatch, rope, rope.qk_layernorm_rope_triton,
                                 torch.empty(2, 4112, 32, 128, **t), freqs, freqs, 16)
        h, mod = torch.empty(2, 4096, 4096, **t), torch.empty(2, 12 * 4096, **t)[:, :4096].unsqueeze(1)
        out += recorded_launches(monkeypatch, adaln, adaln.layernorm_modulate_triton, h, mod, mod)
        out += recorded_launches(monkeypatch, adaln, adaln.gated_residual_triton, h, h, mod)
        out += recorded_launches(monkeypatch, adaln, adaln.gated_residual_layernorm_modulate_triton, h, h, mod, mod,
                                 mod)
    return out


def test_every_kernel_compiles_for_sm90a_without_spills(monkeypatch):
    launches = _launches(monkeypatch)
    kernels = {launch.kernel.__name__ for launch in launches}
    assert kernels == {"rms_norm_kernel", "add_rms_norm_kernel", "silu_mul_kernel", "rope_kv_write_kernel",
                       "decode_partial_kernel", "decode_merge_kernel", "qk_layernorm_rope_kernel", "adaln_kernel"}
    for launch in launches:
        report = ptxas_report(compile_sm90(launch))
        assert report["spill_bytes"] == 0, (launch.kernel.__name__, launch.kwargs, report["log"])
        assert report["registers"] <= 255
