"""The FP8 GEMM's activation quantization as one compiled region: the same e4m3 values and scales as the eager
passes (inductor on CPU standing in for CUDA), and the eager passes, with one log line, when compiling fails."""
import logging

import pytest
import torch
from glm_image_nodes.core.formats import fp8_activation


@pytest.mark.parametrize("rowwise", [True, False])
def test_compiled_region_equals_the_eager_passes(rowwise):
    torch._dynamo.reset()
    fused = fp8_activation.FusedQuantize(compile_on=lambda t: True)
    for rows in (1, 7, 33):  # dynamic M: one compile serves every token count
        x = torch.randn(rows, 256, dtype=torch.bfloat16) * 3
        q, scale = fused(x, rowwise)
        q_ref, scale_ref = fp8_activation.quantize_activation(x, rowwise)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float(), q_ref.float())
        assert torch.equal(scale, scale_ref) and scale.shape == ((rows, 1) if rowwise else (1, 1))
    assert fused.compiled is not None and not fused.failed


def test_a_failing_compile_falls_back_to_the_eager_passes(caplog):
    fused = fp8_activation.FusedQuantize(compile_on=lambda t: True)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    fused.compiled = broken
    x = torch.randn(5, 64)
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        for _ in range(3):
            q, scale = fused(x, True)
            assert torch.equal(q.float(), fp8_activation.quantize_activation(x, True)[0].float())
    assert calls == [1] and fused.failed
    message, = [r.getMessage() for r in caplog.records if r.name == "glm_image_nodes"]
    assert "Failed to find C compiler" in message


def test_out_of_memory_is_not_taken_for_a_failed_compile():
    """An OOM in the compiled region propagates (the stage's OOM message) and keeps the compiled path for later."""
    fused = fp8_activation.FusedQuantize(compile_on=lambda t: True)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fused.compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        fused(torch.randn(5, 64), True)
    assert not fused.failed
