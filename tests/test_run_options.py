"""RunOptions travel with the call: two samplers with different attention choices and compute devices in two
threads each get their own (the attention entry point and the loop's device are spied on per thread), and the
options are checked when they are built."""
import threading

import pytest
import torch
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig
from glm_image_nodes.core.runtime import attention as attention_module
from glm_image_nodes.core.runtime.options import RunOptions
from glm_image_nodes.core.stages import decoder_sampling
from glm_image_nodes.core.stages.decoder_sampling import sample_latents
from glm_image_nodes.core.stages.handles import GlyphConditioning
from glm_image_nodes.core.stages.settings import DecoderRun

H = W = 64
STEPS = 3


def tiny_dit() -> GlmImageDiT:
    torch.manual_seed(0)
    config = GlmImageDiTConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                               time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=64)
    return GlmImageDiT(config).eval()


def test_two_samplers_in_two_threads_each_use_their_own_attention_backend_and_device(monkeypatch):
    dit = tiny_dit()
    glyph = GlyphConditioning(cond=torch.randn(1, 4, 32), uncond=torch.randn(1, 2, 32))
    ids = torch.randint(0, 64, (1, (H // 16) * (W // 16)), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[str]] = {"auto": [], "sdpa": []}
    spy = attention_module._optional_kernel

    def spying(q, k, v, causal, scale, backend):
        seen[threading.current_thread().name].append(backend)
        return spy(q, k, v, causal, scale, backend)

    monkeypatch.setattr(attention_module, "_optional_kernel", spying)
    # cpu:0 differs from cpu as a device while the tensors moved there still work on this CPU-only machine
    devices = {"auto": torch.device("cpu"), "sdpa": torch.device("cpu", 0)}
    loop_devices: dict[str, list] = {"auto": [], "sdpa": []}
    real_noise = decoder_sampling.initial_noise

    def noise_spy(shape, seed, noise, device):
        loop_devices[threading.current_thread().name].append(device)
        return real_noise(shape, seed, noise, device)

    monkeypatch.setattr(decoder_sampling, "initial_noise", noise_spy)
    # every step of one sampler waits for the same step of the other: the two runs overlap step by step
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def run(backend: str) -> None:
        try:
            results[backend] = sample_latents(dit, ids, glyph, H, W, settings=DecoderRun(steps=STEPS, guidance=1.5,
                                                                                         seed=2),
                                              progress=False, preview=lambda x: barrier.wait(),
                                              options=RunOptions(attention=backend), device=devices[backend])
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(b,), name=b) for b in ("auto", "sdpa")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for backend, calls in seen.items():
        # one batched CFG forward per step; per block one attention call for each padding (glyph 4 vs 2 tokens)
        assert len(calls) == STEPS * dit.num_layers * 2, (backend, calls)
        assert set(calls) == {backend}
    assert loop_devices == {backend: [device] for backend, device in devices.items()}
    assert not [k for m in dit.modules() for k in m.__dict__ if "device" in k]
    # on CPU both backends are SDPA: the same latents
    assert torch.equal(results["auto"], results["sdpa"])


def test_run_options_are_checked_when_built(monkeypatch):
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, sage, flash"):
        RunOptions(attention="xformers")
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        RunOptions(kernels="fast")
    with pytest.raises(ValueError, match="compile must be true or false"):
        RunOptions(compile="yes")
    with pytest.raises(AttributeError):
        RunOptions().attention = "sdpa"  # frozen: an options object never changes under a running call
    monkeypatch.setenv("GLMIMAGE_KERNELS", "fused")
    assert RunOptions().kernels == "fused"  # the environment is the default, read when options are built
    monkeypatch.setenv("GLMIMAGE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="GLMIMAGE_KERNELS='bogus'"):
        RunOptions()
