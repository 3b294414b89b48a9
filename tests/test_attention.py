"""The attention entry point: grouped-query folding equals attention over copied K/V heads."""
import pytest
import torch
import torch.nn.functional as F
from glm_image_nodes.core.runtime.attention import attention


def reference(q, k, v, mask=None, causal=False):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


@pytest.mark.parametrize("sq,sk", [(1, 9), (5, 5), (3, 8)])
def test_gqa_matches_copied_heads(sq, sk):
    q, k, v = torch.randn(2, 8, sq, 16), torch.randn(2, 2, sk, 16), torch.randn(2, 2, sk, 16)
    mask = torch.rand(2, 1, sq, sk) > 0.3
    mask[..., 0] = True  # every query sees something
    assert torch.allclose(attention(q, k, v, mask=mask), reference(q, k, v, mask=mask), atol=1e-6)
    additive = torch.randn(sq, sk)
    assert torch.allclose(attention(q, k, v, mask=additive), reference(q, k, v, mask=additive), atol=1e-6)
    causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    assert torch.allclose(attention(q, k, v, causal=True), reference(q, k, v, mask=causal), atol=1e-6)


def test_equal_heads_is_plain_sdpa():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    assert torch.allclose(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_prefill_runs_without_a_mask_tensor(monkeypatch):
    """Causal GQA prefill goes to SDPA with is_causal + enable_gqa (no dense mask, CUDA may pick flash/cuDNN),
    and equals attention over copied K/V heads under an explicit causal mask."""
    from glm_image_nodes.core.runtime import attention as entry
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(entry.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q, k, v = torch.randn(2, 8, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    got = attention(q, k, v, causal=True)
    assert seen == [{"is_causal": True, "scale": None, "enable_gqa": True}]
    want = reference(q, k, v, mask=torch.ones(7, 7, dtype=torch.bool).tril())
    assert torch.allclose(got, want, atol=1e-6)
    # fewer queries than keys (a chunk after a prefix): causal aligned bottom-right, through a mask
    got = attention(q[:, :, -3:], k, v, causal=True)
    assert torch.allclose(got, want[:, :, -3:], atol=1e-6)


def test_backend_choice_is_checked_and_falls_back_on_cpu():
    from glm_image_nodes.core.runtime.attention import BACKENDS, check_backend, installed
    from glm_image_nodes.core.runtime.options import RunOptions
    assert BACKENDS == ("auto", "sdpa", "sage", "flash")
    with pytest.raises(ValueError, match="must be one of"):
        check_backend("xformers")
    for name in ("sage", "flash"):
        if not installed(name):
            with pytest.raises(ValueError, match="pip install"):
                check_backend(name)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="must be one of"):
        RunOptions(attention="xformers")
    assert torch.equal(attention(q, k, v, options=RunOptions(attention="sdpa")), F.scaled_dot_product_attention(q, k,
                                                                                                                v))


def test_flash_and_sage_wrappers_keep_layout_gqa_and_causality(monkeypatch):
    """The optional kernels take other layouts: stand-ins with their documented semantics (flash: [B,S,H,D],
    native GQA, bottom-right causal; sage: HND) must give what SDPA gives."""
    import sys
    import types

    from glm_image_nodes.core.runtime import attention as entry

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None
        return reference(q, k, v, mask=mask).transpose(1, 2), None

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "HND"
        return reference(q, k, v, causal=is_causal)

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    causal = torch.ones(3, 9, dtype=torch.bool).tril(6)
    assert torch.allclose(entry.flash(q, k, v, True, None), reference(q, k, v, mask=causal), atol=1e-6)
    assert torch.allclose(entry.flash(q, k, v, False, None), reference(q, k, v), atol=1e-6)
    q = torch.randn(2, 8, 9, 16)
    assert torch.allclose(entry.sage(q, k, v, True, None), reference(q, k, v, causal=True), atol=1e-6)


@pytest.mark.parametrize("node,args", [
    ("GLMImageARSampler", dict(ar_model=None, prompt="a cat", width=1024, height=1024, seed=0, temperature=0.9,
                               top_p=0.75, top_k=16512, num_images=1)),
    ("GLMImageDecoderSampler", None),
    ("GLMImageCogView4Sampler", dict(decoder=None, conditioning=None, width=1024, height=1024, seed=0, steps=50,
                                     guidance=5.0, num_images=1)),
])
def test_sampler_nodes_refuse_a_missing_attention_package_before_any_work(node, args, monkeypatch):
    """The nodes check the attention choice before touching a model (None here would fail later)."""
    from glm_image_nodes.core.runtime import attention as entry
    from glm_image_nodes.core.stages.handles import TokenGrid
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
    monkeypatch.setattr(entry, "installed", lambda backend: backend in ("auto", "sdpa"))
    optional = NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]
    assert optional["attention"][0] == ["auto", "sdpa", "sage", "flash"]
    if args is None:  # the decoder sampler checks the token grid first; give it a valid one
        tokens = TokenGrid(ids=torch.zeros(1, 32, 32, dtype=torch.long), height=1024, width=1024)
        args = dict(decoder=None, tokens=tokens, glyph=None, seed=0, steps=50, guidance=1.5)
    with pytest.raises(ValueError, match="attention 'sage' needs its package.*pip install sageattention"):
        NODE_CLASS_MAPPINGS[node]().sample(**args, attention="sage")
