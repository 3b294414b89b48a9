"""The last hostile inputs of the 169 tried: each gets the pack's own clear message (or no effect at all)."""
from __future__ import annotations

import inspect

import pytest
import torch
from glm_image_nodes.core.host import interrupts
from glm_image_nodes.core.stages.handles import GlyphConditioning, TokenGrid
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.nodes.common import Check
from glm_image_nodes.testing.tiny_release import write_tiny_release

ODD_VALUES = ["512", [512], {"width": 512}, (512, 512), b"512", object(), float("nan"), None.__class__]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("hostile") / "tiny"))


def node_checks():
    """Each node's checks: a Check rule's core function, or a settings dataclass (built from its fields)."""
    for name, cls in sorted(NODES.items()):
        for check in getattr(cls, "CHECKS", ()):
            yield name, cls, check.function if isinstance(check, Check) else check


def widget_defaults(cls) -> dict:
    required = cls.INPUT_TYPES().get("required", {})
    return {k: v[1]["default"] for k, v in required.items() if len(v) > 1 and isinstance(v[1], dict)
            and "default" in v[1]}


@pytest.mark.parametrize("name,cls,check", list(node_checks()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_node_check_formats_any_value_it_is_given(name, cls, check):
    """In-process callers have no widget types: a check must answer ValueError (its own message) for any value."""
    parameters = list(inspect.signature(check).parameters.values())
    defaults = widget_defaults(cls)
    for parameter in parameters:
        for value in ODD_VALUES:
            args = {**defaults, parameter.name: value}
            if not all(p.name in args for p in parameters if p.default is p.empty):
                continue
            try:
                check(**{p.name: args[p.name] for p in parameters if p.name in args})
            except ValueError as e:
                assert str(e)
            # anything else (TypeError from formatting a str with %, comparisons of lists...) fails the test


def test_ar_sampler_in_process_with_a_string_width_gets_the_packs_message():
    with pytest.raises(ValueError, match=r"width must be a whole number, got '512' \(str\)"):
        NODES["GLMImageARSampler"]().sample(None, "a cat", "512", 1024, seed=0, temperature=0.9, top_p=0.75,
                                            top_k=16512, num_images=1)


def test_glyph_embeddings_of_another_width_are_refused_at_the_node(release):
    (decoder,) = NODES["GLMImageDecoderLoader"]().load(release, "fp32")
    tokens = TokenGrid(torch.zeros(1, 2, 2, dtype=torch.long), 64, 64)
    other = GlyphConditioning(torch.randn(1, 3, 48), torch.randn(1, 1, 48))
    sampler = NODES["GLMImageDecoderSampler"]()
    with pytest.raises(ValueError, match=r"glyph embeddings \(cond / uncond \(1, 3, 48\) / \(1, 1, 48\)\) are not 32 "
                                         r"wide.*another text encoder"):
        sampler.sample(decoder, tokens, other, seed=0, steps=1, guidance=1.5)
    own = GlyphConditioning(torch.randn(1, 3, 32), torch.randn(1, 1, 32))
    (latent,) = sampler.sample(decoder, tokens, own, seed=0, steps=1, guidance=1.5)
    assert latent["samples"].shape == (1, 16, 8, 8)


def test_an_interrupt_requested_while_idle_does_not_abort_a_node_called_in_process(release):
    (vae,) = NODES["GLMImageVAELoader"]().load(release, "fp32")
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    decode = NODES["GLMImageVAEDecode"]()
    interrupts.request_interrupt()              # a Stop pressed while nothing ran
    (image,) = decode.decode(vae, latent, "on")
    assert image.shape == (1, 32, 32, 3)
    with interrupts.run_scope():                # while a run is in progress, a request stops it
        interrupts.request_interrupt()
        with pytest.raises(interrupts.Interrupted):
            decode.decode(vae, latent, "on")
