"""64-bit row offsets: at 2048x2048 with 16 images and batched CFG the DiT's residual stream has
B * S * 4096 > 2^31 elements, so ``row * stride`` must be computed in 64 bits. Checked in the TTIR that
``triton.compile`` builds for sm_90 at such launch shapes (meta tensors: nothing is allocated): every scalar
offset added to a kernel's pointer argument is i64."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")
from glm_image_nodes.core.cuda import activations, adaln, dequant, norms, rope  # noqa: E402
from triton_harness import compile_sm90, recorded_launches  # noqa: E402

META = dict(device="meta", dtype=torch.bfloat16)
ROWS = 32 * 17_000  # 16 images x (cond, uncond), 4096 image + glyph tokens at 2048x2048 (~16,900 tokens)
SCALAR_ADDPTR = re.compile(r"tt\.addptr %(\w+), %\w+ : !tt\.ptr<\w+>, (i\d+)")


def _launches(monkeypatch):
    h, mod = torch.empty(32, 17_000, 4096, **META), torch.empty(32, 1, 4096, **META)
    w = torch.empty(4096, **META)
    qk = torch.empty(32, 17_000, 32, 128, **META)  # [B, S, H, D]: b * st_b passes 2^31
    cos = torch.empty(16_384, 128, device="meta", dtype=torch.float32)
    return (recorded_launches(monkeypatch, adaln, adaln.gated_residual_layernorm_modulate_triton, h, h, mod, mod, mod)
            + recorded_launches(monkeypatch, norms, norms.rms_norm_triton, h, w, 1e-5)
            + recorded_launches(monkeypatch, norms, norms.add_rms_norm_triton, h, h, w, w, 1e-5)
            + recorded_launches(monkeypatch, activations, activations.silu_mul_triton,
                                torch.empty(ROWS, 2 * 4096, **META))
            + recorded_launches(monkeypatch, rope, rope.qk_layernorm_rope_triton, qk, cos, cos, 512)
            # packed weights of more than 2^31 bytes or values (one launch per weight)
            + recorded_launches(monkeypatch, dequant, dequant.fp8_triton,
                                torch.empty(600_000, 4096, device="meta", dtype=torch.uint8), False,
                                torch.empty(600_000, 1, device="meta", dtype=torch.float32), torch.bfloat16)
            + recorded_launches(monkeypatch, dequant, dequant.gguf_triton,
                                torch.empty(70_000_000, 34, device="meta", dtype=torch.uint8), "Q8_0", torch.bfloat16))


def test_offsets_past_2_31_are_computed_in_64_bits(monkeypatch):
    launches = _launches(monkeypatch)
    assert {launch.kernel.__name__ for launch in launches} == {
        "adaln_kernel", "rms_norm_kernel", "add_rms_norm_kernel", "silu_mul_kernel", "qk_layernorm_rope_kernel",
        "fp8_kernel", "gguf_kernel"}
    for launch in launches:
        ttir = compile_sm90(launch).asm["ttir"]
        pointer_args = set(re.findall(r"%(\w+_ptr): !tt\.ptr", ttir))
        offsets = [(base, width) for base, width in SCALAR_ADDPTR.findall(ttir) if base in pointer_args]
        assert offsets, launch.kernel.__name__
        narrow = [base for base, width in offsets if width != "i64"]
        assert not narrow, (launch.kernel.__name__, narrow)
