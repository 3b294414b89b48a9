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
