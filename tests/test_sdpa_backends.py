"""SDPA: the kernel choice is torch's; restricting it works on the installed torch and on older signatures;
the declared torch floor is the newest API the pack calls without a fallback."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from glm_image_nodes.core.runtime import attention, sdpa_backends
from torch.nn.attention import SDPBackend

ROOT = Path(__file__).resolve().parents[1]
# API: the torch version that added it (release notes / the PRs named), each used by the pack without a fallback
TORCH_APIS = {"torch.library.custom_op": (2, 4), "CustomOpDef.register_fake": (2, 4),
              "torch._scaled_mm with [M,1]/[1,N] rowwise scales": (2, 5), "SDPA enable_gqa": (2, 5),
              "torch.nn.attention.sdpa_kernel": (2, 3)}


class Recorder:
    def __init__(self):
        self.calls = []



def _old_sdpa_kernel(recorder):  # torch 2.5's signature
    def sdpa_kernel(backends):
        recorder.calls.append({})
        return torch.nn.attention.sdpa_kernel(backends)
    return sdpa_kernel


def _new_sdpa_kernel(recorder):  # torch 2.6+
    def sdpa_kernel(backends, set_priority=False):
        recorder.calls.append({"set_priority": set_priority})
        return torch.nn.attention.sdpa_kernel(backends, set_priority=set_priority)
    return sdpa_kernel


def test_restricting_takes_the_branch_the_signature_allows():
    old, new = Recorder(), Recorder()
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    q = torch.randn(1, 2, 5, 16)
    for recorder, fake in ((old, _old_sdpa_kernel(old)), (new, _new_sdpa_kernel(new))):
        with sdpa_backends.restricted(order, kernel=fake):
            F.scaled_dot_product_attention(q, q, q)
        with sdpa_backends.restricted([SDPBackend.MATH], kernel=fake):
            F.scaled_dot_product_attention(q, q, q)
    assert old.calls == [{}, {}]  # never set_priority where the signature lacks it
    assert new.calls == [{"set_priority": True}, {"set_priority": False}]  # one backend needs no order
    assert not sdpa_backends.has_set_priority(_old_sdpa_kernel(old))
    installed = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    assert sdpa_backends.has_set_priority() == (installed >= (2, 6))


def test_cudnn_first_only_where_torch_itself_prefers_it():
    assert sdpa_backends.torch_prefers_cudnn((9, 0), 91600)
    assert sdpa_backends.torch_prefers_cudnn((10, 0), 91700)
    assert not sdpa_backends.torch_prefers_cudnn((9, 0), 91500)  # wrong results for lengths % 128 != 0
    assert not sdpa_backends.torch_prefers_cudnn((8, 9), 92000)
    assert not sdpa_backends.torch_prefers_cudnn((8, 6), None)


def test_attention_leaves_the_kernel_to_torch():
    """No sdpa_kernel block of the pack's own around its SDPA: a user's restriction reaches torch untouched
    (here one no CPU kernel satisfies, so torch refuses), and without one torch picks."""
    q = torch.randn(1, 4, 6, 16)
    k = torch.randn(1, 2, 6, 16)
    want = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    assert torch.equal(attention.attention(q, k, k, causal=True), want)
    assert not hasattr(attention, "sdpa_kernel")
    with torch.nn.attention.sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), pytest.raises(RuntimeError):
        attention.attention(q, k, k, causal=True)


def test_runnable_backends_on_cpu():
    q = torch.randn(1, 2, 9, 16)
    names = sdpa_backends.runnable(q, q, q, is_causal=True)
    assert "math" in names and "cudnn" not in names


def test_declared_torch_floor_is_the_newest_api_used():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = tuple(int(p) for p in re.search(r'"torch>=(\d+)\.(\d+)"', pyproject).groups())
    assert floor == max(TORCH_APIS.values())
    assert "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
    assert hasattr(torch.library, "custom_op") and hasattr(torch, "_scaled_mm")

