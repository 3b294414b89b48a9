"""First-use self-checks of the fused paths, on CPU.

The fused paths are made to look available on CPU (Triton "installed", CPU fp32 tensors accepted by the
kernels, FP8 GEMMs "supported"), then broken: a kernel that raises (what a missing C compiler or Python.h
does at the first launch) and one that returns wrong values. The model must run on the references, give the
reference output, and warn once per broken op; ``GLMIMAGE_KERNELS=fused`` still forces the broken op (and
raises). With the interpreter, every real kernel passes its own check on its sample.
"""
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glm_image_nodes.core.cuda import activations, adaln, decode_attention, dequant, dispatch, norms, rope, self_check  # noqa: E402
from glm_image_nodes.core.cuda.kernel_checks import kernel_check  # noqa: E402
from glm_image_nodes.core.formats import fp8, fused_dequant, ggml  # noqa: E402
from glm_image_nodes.core.formats.layers import Linear, Packed  # noqa: E402
from glm_image_nodes.core.models.glm_ar import ARConfig, GlmImageAR  # noqa: E402
from glm_image_nodes.core.runtime.options import RunOptions  # noqa: E402

BUILD_ERROR = "Python.h: No such file or directory"


@pytest.fixture
def fused_looks_available(monkeypatch):
    """CPU fp32 tensors count as kernel tensors; verdicts start empty and are dropped afterwards."""
    monkeypatch.setattr(dispatch, "HAVE_TRITON", True)
    monkeypatch.setattr(dispatch, "kernel_tensor", lambda t: t.dtype == torch.float32)
    self_check.forget()
    yield
    self_check.forget()


def _raises(*_args):
    raise RuntimeError(f"/tmp/main.c:5:10: fatal error: {BUILD_ERROR}\ncompilation terminated.")


def _wrong_silu_mul(gate_up):
    return activations.silu_mul_reference(gate_up) * 1.5


def _tiny_ar():
    torch.manual_seed(0)
    cfg = ARConfig.from_text_config(dict(vocab_size=300, vision_vocab_size=200, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, rope_parameters={"partial_rotary_factor": 0.5,
                                                                       "mrope_section": [2, 3, 3]}))
    model = GlmImageAR(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _generate(model, kernels: str, steps=4):
    """Prefill of 6 tokens, then greedy decode steps (the fused decode-attention path) under kernel mode
    ``kernels``: all logits."""
    options = RunOptions(kernels=kernels)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, 6 + steps)
    out = []
    with torch.no_grad():
        logits = model(ids, torch.arange(6).expand(3, 2, 6), cache, 0, options=options)
        out.append(logits)
        for i in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, torch.full((3, 2, 1), 6 + i), cache, torch.tensor(6 + i), options=options)
            out.append(logits)
    return torch.cat(out, dim=1)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]


def test_broken_kernels_fall_back_to_the_references_and_warn_once(fused_looks_available, monkeypatch, caplog):
    model = _tiny_ar()
    want = _generate(model, "fused")  # every op's custom op, each running its torch reference on CPU
    # the SDPA decode path instead of the decode-attention op
    torch.testing.assert_close(_generate(model, "reference"), want, rtol=0, atol=1e-5)
    monkeypatch.setitem(dispatch.OPS, "rms_norm", _raises)
    monkeypatch.setitem(dispatch.OPS, "silu_mul", _wrong_silu_mul)
    calls = []
    real_decode = dispatch.OPS["decode_attention"]
    monkeypatch.setitem(dispatch.OPS, "decode_attention", lambda *a: calls.append(1) or real_decode(*a))
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        got = _generate(model, "auto")
        again = _generate(model, "auto")
    assert torch.equal(got, want) and torch.equal(again, want)
    messages = _warnings(caplog)
    assert len(messages) == 2, messages  # once per broken op, not per call
    build, = [m for m in messages if "fused rms_norm" in m]
    assert BUILD_ERROR in build and "python3-dev" in build and "cpu/float32" in build
    wrong, = [m for m in messages if "fused silu_mul" in m]
    assert "differs from the reference by 0.5" in wrong and "glm-image-check" in wrong
    verdicts = {v.op: v for v in self_check.verdicts()}
    assert not verdicts["rms_norm"].ok and not verdicts["silu_mul"].ok
    assert verdicts["add_rms_norm"].ok and verdicts["decode_attention"].ok
    assert len(calls) > 8  # a passing op does run fused: the check is not a blanket switch-off (1 check + decodes)


def test_a_kernel_of_the_wrong_output_shape_falls_back_too(fused_looks_available, monkeypatch, caplog):
    """A wrong shape is a wrong result: the reference takes over (the check must not raise into the model)."""
    model = _tiny_ar()
    want = _generate(model, "reference")
    monkeypatch.setitem(dispatch.OPS, "silu_mul", lambda gate_up: gate_up)  # [.., 2n] where [.., n] is due
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        got = _generate(model, "auto")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    message, = _warnings(caplog)
    assert "fused silu_mul" in message and "has shape" in message and "glm-image-check" in message


def test_two_threads_run_a_check_once(fused_looks_available, monkeypatch, caplog):
    """Two samplers in two threads asking for the same op, device and dtype: one check, one warning."""
    import threading
    import time

    runs = []

    def slow_and_broken(*args):
        runs.append(1)
        time.sleep(0.2)  # the second thread asks while the first is still checking
        return _raises()

    monkeypatch.setitem(self_check.CHECKS, "rms_norm", kernel_check("rms_norm", slow_and_broken))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        self_check.passed("rms_norm", torch.device("cpu"), torch.float32))) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == [False, False] and len(runs) == 1
    assert len(_warnings(caplog)) == 1


def test_out_of_memory_during_a_check_leaves_no_verdict(fused_looks_available, monkeypatch):
    """A device full at the first use says nothing about the kernel: the OOM propagates, the op is not
    switched off for the process, and the next use checks again."""
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setitem(self_check.CHECKS, "rms_norm", kernel_check("rms_norm", out_of_memory))
    with pytest.raises(torch.OutOfMemoryError):
        self_check.passed("rms_norm", torch.device("cpu"), torch.float32)
    assert self_check.verdicts() == []
    monkeypatch.setitem(self_check.CHECKS, "rms_norm", kernel_check("rms_norm", norms.rms_norm_reference))
    assert self_check.passed("rms_norm", torch.device("cpu"), torch.float32)


def test_forced_fused_mode_skips_the_check_and_raises(fused_looks_available, monkeypatch):
    model = _tiny_ar()
    monkeypatch.setitem(dispatch.OPS, "rms_norm", _raises)
    with pytest.raises(RuntimeError, match="Python.h"):
        _generate(model, "fused")
    assert self_check.verdicts() == []


def test_a_broken_fp8_gemm_falls_back_to_the_dequantized_weight(fused_looks_available, monkeypatch, caplog):
    layer = Linear(64, 48)
    layer._init_packing(torch.bfloat16)
    weight, scale = fp8.quantize(torch.randn(48, 64))
    layer.assign_weight(Packed(weight, "fp8", (48, 64), scale), torch.device("cpu"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, fp8.dequantize(weight, scale, torch.bfloat16), layer.bias.bfloat16())
    gemm_calls = []
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: True)
    monkeypatch.setattr(fp8, "scaled_mm_linear", lambda *a, **k: gemm_calls.append(1) or _raises())
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        for _ in range(3):
            assert torch.equal(layer(x), want)
    assert len(gemm_calls) == 1  # the check only
    message, = _warnings(caplog)
    assert "fused scaled_mm on cpu/bfloat16" in message
    assert "GLMIMAGE_KERNELS=reference does not switch the FP8 GEMM off" in message  # no false off switch


def test_a_working_fp8_gemm_passes_its_check(fused_looks_available, monkeypatch):
    """The real ``scaled_mm_linear`` (torch's CPU ``_scaled_mm``) is within the stated FP8 tolerance."""
    assert self_check.passed("scaled_mm", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("op, kernel", [
    ("rms_norm", norms.rms_norm_triton), ("add_rms_norm", norms.add_rms_norm_triton),
    ("silu_mul", activations.silu_mul_triton), ("decode_attention", decode_attention.decode_attention_triton),
    ("qk_layernorm_rope", rope.qk_layernorm_rope_triton), ("layernorm_modulate", adaln.layernorm_modulate_triton),
    ("gated_residual", adaln.gated_residual_triton),
    ("gated_residual_layernorm_modulate", adaln.gated_residual_layernorm_modulate_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_passes_its_own_check_in_the_interpreter(monkeypatch, op, kernel, dtype):
    pytest.importorskip("triton")
    from triton_harness import interpreted
    interpreted(monkeypatch)
    module = sys.modules[kernel.__module__]
    check = kernel_check(op, lambda *args: getattr(module, kernel.__name__)(*args))
    assert self_check._run(check, torch.device("cpu"), dtype) == ""
    broken = kernel_check(op, lambda *args: tuple(t * 1.1 for t in _as_tuple(getattr(module, kernel.__name__)(*args))))
    assert "differs from the reference" in self_check._run(broken, torch.device("cpu"), dtype)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def test_eager_cuda_calls_launch_triton_directly_and_compiled_ones_keep_the_custom_op(monkeypatch):
    """Eagerly on CUDA the model calls each Triton launcher without the custom-op dispatcher (host time per AR
    token); under torch.compile it keeps the opaque custom op. CPU tensors stand in for CUDA ones."""
    launched, dispatched = [], []
    monkeypatch.setattr(dispatch, "launches_directly",
                        lambda t: not torch.compiler.is_compiling())
    monkeypatch.setitem(dispatch.TRITON, "rms_norm", lambda *a: launched.append(1) or norms.rms_norm_reference(*a))
    real = dispatch.OPS["rms_norm"]
    monkeypatch.setitem(dispatch.OPS, "rms_norm", lambda *a: dispatched.append(1) or real(*a))
    x, w = torch.randn(3, 64), torch.randn(64)
    want = norms.rms_norm_reference(x, w, 1e-5)  # kernel mode fused, passed with each call
    assert torch.equal(dispatch.rms_norm(x, w, 1e-5, "fused"), want) and (launched, dispatched) == ([1], [])
    compiled = torch.compile(lambda a: dispatch.rms_norm(a, w, 1e-5, "fused"), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), want) and launched == [1] and dispatched


def _q4_k_linear():
    layer = Linear(256, 8, bias=False)
    layer._init_packing(torch.float32)
    data = ggml.quantize(torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.1, ggml.QTYPES["Q4_K"])
    layer.assign_weight(Packed(data, "Q4_K", (8, 256)), torch.device("cpu"))
    want_weight = ggml.dequantize(data, ggml.QTYPES["Q4_K"], (8, 256))
    return layer, want_weight


@pytest.mark.parametrize("broken, cause", [(_raises, BUILD_ERROR), ("wrong", "differs from the reference by")])
def test_a_broken_dequantization_kernel_falls_back_to_the_torch_route(fused_looks_available, monkeypatch, caplog,
                                                                      broken, cause):
    """A packed layer whose one-pass kernel fails to build or computes wrong values dequantizes by the torch
    route, with one warning; a working kernel (here its custom op, on CPU) is checked once and then used."""
    monkeypatch.setattr(dispatch, "kernel_output", lambda device, dtype: dtype == torch.float32)
    layer, want_weight = _q4_k_linear()
    x = torch.randn(3, 256)
    want = torch.nn.functional.linear(x, want_weight)
    real, calls = fused_dequant._run_gguf, []
    monkeypatch.setattr(fused_dequant, "_run_gguf", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    assert len(calls) == 3  # the check, then both calls
    if broken == "wrong":
        broken = lambda *a: real(*a) * 1.5  # noqa: E731
    monkeypatch.setattr(fused_dequant, "_run_gguf", lambda *a: calls.append(1) or broken(*a))
    self_check.forget()
    with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
        for _ in range(3):
            assert torch.equal(layer(x), want)
    assert len(calls) == 4  # the check only
    message, = _warnings(caplog)
    assert "fused dequant_Q4_K on cpu/float32" in message and cause in message


@pytest.mark.parametrize("op", ["dequant_fp8", "dequant_Q8_0", "dequant_Q4_K", "dequant_Q6_K"])
def test_every_dequantization_kernel_passes_its_own_check_in_the_interpreter(monkeypatch, op):
    pytest.importorskip("triton")
    import dataclasses

    from triton_harness import interpreted
    interpreted(monkeypatch)
    if op == "dequant_fp8":
        launch = fused_dequant.both_fp8_formats(dequant.fp8_triton)
        wrong = fused_dequant.both_fp8_formats(lambda *args: dequant.fp8_triton(*args).mul(1 + 2 ** -7))
    else:
        launch = dequant.gguf_triton
        wrong = lambda *args: dequant.gguf_triton(*args).mul(1 + 2 ** -7)  # noqa: E731
    check = dataclasses.replace(self_check.CHECKS[op], fused=launch)
    assert self_check._run(check, torch.device("cpu"), torch.bfloat16) == ""
    broken = dataclasses.replace(check, fused=wrong)
    assert "differs from the reference" in self_check._run(broken, torch.device("cpu"), torch.bfloat16)


def test_the_dequantization_decision_follows_the_kernel_mode(fused_looks_available, monkeypatch):
    """``fused`` forces the op, ``reference`` never runs it, ``auto`` only for outputs a kernel writes (fp16
    keeps the torch route) and only after the op's check passed."""
    monkeypatch.setattr(dispatch, "kernel_output", lambda device, dtype: dtype == torch.float32)
    cpu = torch.device("cpu")
    assert dispatch.fused_for(cpu, torch.float16, "dequant_Q4_K", "fused")
    assert not dispatch.fused_for(cpu, torch.float32, "dequant_Q4_K", "reference")
    assert not dispatch.fused_for(cpu, torch.float16, "dequant_Q4_K", "auto")
    assert self_check.verdicts() == []
    assert dispatch.fused_for(cpu, torch.float32, "dequant_Q4_K", "auto")
    assert [(v.op, v.ok) for v in self_check.verdicts()] == [("dequant_Q4_K", True)]
