"""The fused kernels and the captured AR decode step on a real GPU (skipped without CUDA and Triton).

Every custom op on CUDA tensors against its torch reference (fp32 to rounding-level tolerances; bf16 within
one ulp on a few elements, as in the interpreter tests), and the AR sampler's tokens for a seed equal across
eager, "cuda graph" and "compiled" decode steps with the fused kernels on.
"""
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from glm_image_nodes.core.cuda import activations, adaln, decode_attention, norms, rope  # noqa: E402
from glm_image_nodes.core.models.glm_ar import ARConfig, GlmImageAR  # noqa: E402
from glm_image_nodes.core.runtime.options import RunOptions  # noqa: E402
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid  # noqa: E402
from glm_image_nodes.core.stages.settings import ARSampling  # noqa: E402
from glm_image_nodes.testing.tiny_glm_image_tokenizer import write_tiny_glm_image_tokenizer  # noqa: E402
from test_cuda_kernels import assert_matches, randn  # noqa: E402

CUDA = torch.device("cuda")


def on_gpu(*tensors):
    return [t.to(CUDA) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_the_gpu(dtype):
    x, branch = on_gpu(randn(3, 2, 4096, dtype=dtype, seed=1), randn(3, 2, 4096, dtype=dtype, seed=2, scale=30))
    w1, w2 = on_gpu(randn(4096, dtype=dtype, seed=3), randn(4096, dtype=dtype, seed=4))
    assert_matches(norms.rms_norm_triton(x, w1, 1e-5), norms.rms_norm_reference(x, w1, 1e-5))
    for g, w in zip(norms.add_rms_norm_triton(x, branch, w1, w2, 1e-5),
                    norms.add_rms_norm_reference(x, branch, w1, w2, 1e-5)):
        assert_matches(g, w)
    gate_up = on_gpu(randn(2, 1, 27392, dtype=dtype, seed=5, scale=3))[0]
    assert_matches(activations.silu_mul_triton(gate_up), activations.silu_mul_reference(gate_up))
    q, k, v = on_gpu(randn(1, 1, 4096, dtype=dtype, seed=6), randn(1, 1, 256, dtype=dtype, seed=7),
                     randn(1, 1, 256, dtype=dtype, seed=8))
    angles = randn(1, 1, 1, 32, seed=9).to(CUDA)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    caches = on_gpu(randn(1, 2, 3000, 128, dtype=dtype, seed=10), randn(1, 2, 3000, 128, dtype=dtype, seed=11))
    mine = [c.clone() for c in caches]
    valid = torch.ones(1, 3000, dtype=torch.bool, device=CUDA)
    for index in (0, 1234, 2999):
        idx = torch.tensor(index, device=CUDA)
        got = decode_attention.decode_attention_triton(q, k, v, cos, sin, *mine, valid, idx, 128 ** -0.5)
        want = decode_attention.decode_attention_reference(q, k, v, cos, sin, *caches, valid, idx, 128 ** -0.5)
        for g, w in zip(mine, caches):
            assert_matches(g, w)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= (2e-5 if dtype == torch.float32 else 2 ** -6) * max(1.0, want.abs().max().item()), err
    t = randn(2, 272, 4096, dtype=dtype, seed=12, scale=4).to(CUDA).unflatten(2, (32, 128))
    freqs = randn(256, 64, seed=13).to(CUDA)
    cos2, sin2 = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    assert_matches(rope.qk_layernorm_rope_triton(t, cos2, sin2, 16),
                   rope.qk_layernorm_rope_reference(t, cos2, sin2, 16).contiguous())
    h, out = on_gpu(randn(2, 300, 4096, dtype=dtype, seed=14, scale=5), randn(2, 300, 4096, dtype=dtype, seed=15))
    mods = randn(2, 12 * 4096, dtype=dtype, seed=16).to(CUDA).chunk(12, dim=1)
    gate, scale, shift = (m.unsqueeze(1) for m in mods[:3])
    assert_matches(adaln.layernorm_modulate_triton(h, scale, shift),
                   adaln.layernorm_modulate_reference(h, scale, shift))
    for g, w in zip(adaln.gated_residual_layernorm_modulate_triton(h, out, gate, scale, shift),
                    adaln.gated_residual_layernorm_modulate_reference(h, out, gate, scale, shift)):
        assert_matches(g, w)


def test_captured_and_compiled_steps_give_the_eager_tokens(tmp_path):
    from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
    write_tiny_glm_image_tokenizer(str(tmp_path))
    tok = load_text_tokenizer(str(tmp_path))
    cfg = ARConfig.from_text_config({"vocab_size": 168064, "hidden_size": 256, "intermediate_size": 512,
                                     "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 2,
                                     "head_dim": 128})
    torch.manual_seed(0)
    model = GlmImageAR(cfg).to(CUDA, torch.bfloat16).eval()
    runs = {}
    for mode in ("eager", "cuda graph", "compiled"):
        runs[mode] = generate_token_grid(model, tok, "a red fox", 256, 256, ARSampling(seed=3, decode_steps=mode),
                                         progress=False, options=RunOptions(kernels="auto")).ids
    assert torch.equal(runs["cuda graph"], runs["eager"])
    # inductor's own fusions may round differently from the fused kernels: allow rare differences
    assert (runs["compiled"] == runs["eager"]).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fused_op_passes_its_self_check_on_the_gpu(dtype):
    """What a user's first run does: each op checked once against its reference (core/cuda/self_check.py)."""
    from glm_image_nodes.core.cuda import self_check
    from glm_image_nodes.core.formats import fp8, fused_dequant  # noqa: F401  (registers the dequant checks)
    device = torch.device("cuda", torch.cuda.current_device())
    ops = [op for op in self_check.CHECKS if op != "scaled_mm"]
    assert "dequant_fp8" in ops and "dequant_Q4_K" in ops
    if dtype == torch.bfloat16 and fp8.has_fp8_matmul(device):
        ops.append("scaled_mm")
    verdicts = [v for v in self_check.check_all(device, dtype, ops) if v.dtype == str(dtype)[6:]]
    failed = {v.op: v.cause for v in verdicts if not v.ok}
    assert not failed, failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_kernels_on_the_gpu(dtype):
    """The one-pass FP8/GGUF kernels on CUDA: bit-equal to the float32 route computed on the CPU, on random
    bytes of many blocks (several programs) and through a packed Linear under the default kernel mode."""
    from glm_image_nodes.core.cuda import dequant
    from glm_image_nodes.core.formats import fused_dequant, ggml
    from glm_image_nodes.core.formats.layers import Linear, Packed
    q_bytes, e5m2, scale, _ = fused_dequant.sample_fp8("cpu", dtype, rows=300, cols=3000)
    want = (q_bytes.view(torch.float8_e4m3fn).float() * scale).to(dtype)
    assert torch.equal(dequant.fp8_triton(*on_gpu(q_bytes), e5m2, *on_gpu(scale), dtype).cpu(), want)
    for kind in fused_dequant.GGUF_KINDS:
        qtype = ggml.QTYPES[kind]
        blocks, _, _ = fused_dequant.sample_gguf(kind, "cpu", dtype, n=4099)
        want = ggml.dequantize(blocks, qtype, (blocks.shape[0], qtype.block_size)).to(dtype)
        assert torch.equal(dequant.gguf_triton(*on_gpu(blocks), kind, dtype).cpu(), want), kind
    layer = Linear(512, 64, bias=False)
    layer._init_packing(dtype)
    qtype = ggml.QTYPES["Q6_K"]
    data = ggml.quantize(randn(64, 512, scale=0.05), qtype)
    layer.assign_weight(Packed(data, "Q6_K", (64, 512)), CUDA)
    assert torch.equal(layer.compute_weight(CUDA).cpu(), ggml.dequantize(data, qtype, (64, 512)).to(dtype))
