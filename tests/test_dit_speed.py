"""The DiT's speed paths on CPU (fp32, tiny random decoder): CFG batched across glyph lengths, the fused-kernel
code path (custom ops running their torch references), the regional compile and the step cache.

Parity of the padded CFG batch with diffusers' pipeline is in test_decoder_sampling (glyph lengths 7 and 5
against the 1-token unconditional glyph) and test_cogview4_dit (prompt 9 vs negative 4 tokens)."""
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from glm_image_nodes.core.models.glm_image_dit import load_decoder  # noqa: E402
from glm_image_nodes.core.runtime.options import RunOptions  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import left_pad, sample_latents  # noqa: E402
from glm_image_nodes.core.stages.handles import GlyphConditioning  # noqa: E402
from glm_image_nodes.core.stages.settings import DecoderRun  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import single_thread, tiny_glm_image_dit, write_release  # noqa: E402

TOL = 1e-5
H, W = 64, 96
GRID = (H // 16) * (W // 16)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = write_release(str(tmp_path_factory.mktemp("glm")), tiny_glm_image_dit(seed=3), "GlmImagePipeline")
    return load_decoder(root, dtype="fp32", device="cpu")


def glyph(cond_len=6, uncond_len=2, batch=1):
    g = torch.Generator().manual_seed(0)
    return GlyphConditioning(cond=torch.randn(batch, cond_len, 32, generator=g),
                             uncond=torch.randn(1, uncond_len, 32, generator=g))


def prior(batch=1):
    return torch.randint(0, 64, (batch, GRID), generator=torch.Generator().manual_seed(1))


def count_forwards(module):
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))


def test_left_pad():
    a, b = torch.ones(2, 3, 4), torch.full((2, 1, 4), 2.0)
    both, pads = left_pad([a, b])
    assert both.shape == (4, 3, 4) and pads == (0, 0, 2, 2)
    assert torch.equal(both[2:, :2], torch.zeros(2, 2, 4)) and torch.equal(both[2:, 2:], b)
    assert left_pad([a, a])[1] is None


def test_padded_batch_equals_separate_forwards(dit):
    """One forward over [cond; uncond] with the shorter glyph left-padded == two unpadded forwards."""
    g = glyph(7, 2, batch=2)
    x = torch.randn(2, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    ids, t = prior(2), torch.tensor([700.0, 700.0])
    size, crop = torch.tensor([[H * 1.0, W * 1.0]] * 2), torch.zeros(2, 2)
    both_glyph, pads = left_pad([g.cond, g.uncond.expand(2, -1, -1)])
    with torch.no_grad():
        both = dit(torch.cat([x, x]), both_glyph, torch.cat([ids, ids]), torch.tensor([False, False, True, True]),
                   t.repeat(2), size.repeat(2, 1), crop.repeat(2, 1), text_pad=pads)
        cond = dit(x, g.cond, ids, False, t, size, crop)
        uncond = dit(x, g.uncond.expand(2, -1, -1), ids, True, t, size, crop)
    assert (both - torch.cat([cond, uncond])).abs().max().item() <= TOL
    # without the padding excluded the zero-padded keys would change the result
    with torch.no_grad():
        unmasked = dit(x, both_glyph[2:], ids, True, t, size, crop)
    assert (unmasked - uncond).abs().max().item() > 100 * TOL


def test_cfg_runs_one_forward_per_step_when_glyph_lengths_differ(dit):
    calls, hook = count_forwards(dit)
    try:
        sample_latents(dit, prior(), glyph(6, 2), H, W, settings=DecoderRun(steps=3, guidance=1.5), progress=False)
    finally:
        hook.remove()
    assert calls == [2, 2, 2]


def test_fused_kernel_path_matches_the_reference(dit):
    g, ids = glyph(), prior()
    want = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=2), progress=False,
                          options=RunOptions(kernels="reference"))
    got = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=2), progress=False,
                         options=RunOptions(kernels="fused"))
    assert (got - want).abs().max().item() <= TOL


def test_regional_compile_matches_eager(dit):
    torch._dynamo.reset()
    g, ids = glyph(), prior()
    want = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=2), progress=False)
    got = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=2), progress=False,
                         options=RunOptions(compile=True))
    assert "compile_blocks" not in vars(dit)  # the option travels with the call, not on the shared model
    assert (got - want).abs().max().item() <= TOL


def test_step_cache(dit):
    g, ids = glyph(), prior()
    exact = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=6), progress=False)
    assert torch.equal(sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=6, step_cache=0.0), progress=False),
                       exact)
    calls, hook = count_forwards(dit.transformer_blocks[1])
    try:
        cached = sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=6, step_cache=10.0), progress=False)
    finally:
        hook.remove()
    # the first step has nothing to compare with; with a huge threshold every later step reuses it
    assert len(calls) == 1
    assert torch.isfinite(cached).all() and (cached - exact).abs().max() > TOL
    with pytest.raises(ValueError, match="step_cache must be >= 0"):
        sample_latents(dit, ids, g, H, W, settings=DecoderRun(steps=1, step_cache=-1.0), progress=False)
