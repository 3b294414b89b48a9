"""The AR decode step's fast paths on CPU: greedy decoding against transformers, the fused-kernel code path
(custom ops running their torch references) and ``torch.compile(fullgraph=True)`` give the reference's tokens."""
import pytest
import torch
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.runtime.options import RunOptions
from glm_image_nodes.core.stages.ar_prompt import build_ar_inputs, load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.settings import ARSampling
from tiny_glm_release import make_release

PROMPT = "a cat, the 32"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_release")
    torch.manual_seed(0)
    hf, processor = make_release(str(root))
    return hf, processor, load_ar_model(str(root), dtype="fp32", device="cpu"), load_text_tokenizer(str(root))


def _edit(model, tok, options=None, **settings):
    """Editing writes only the 4x4 target grid: short walks."""
    return generate_token_grid(model, tok, "make it blue", 128, 128, ARSampling(**{"seed": 7, **settings}),
                               source_grids=[torch.arange(16).view(4, 4) * 1000], progress=False, options=options)


def test_greedy_matches_transformers_do_sample_false(release):
    hf, processor, model, tok = release
    steps = 40
    inputs = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]],
                                           tokenize=True, target_h=256, target_w=256, return_dict=True,
                                           return_tensors="pt")
    # the reference's greedy decoding over codebook ids only: the reserved ids (>= 16384) suppressed
    ref = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      suppress_tokens=list(range(tok.codebook_size, 16512)))[:, inputs["input_ids"].shape[1]:]
    assert build_ar_inputs(tok, [PROMPT], 256, 256).input_ids.shape == inputs["input_ids"].shape
    grid = generate_token_grid(model, tok, PROMPT, 256, 256, settings=ARSampling(seed=0, temperature=0), progress=False)
    ours = torch.cat([grid.preview.flatten(1), grid.ids.flatten(1)], dim=1)  # generation order: preview first
    assert torch.equal(ours[:, :steps], ref)
    assert len(set(ref[0].tolist())) > 5  # not a constant stream
    # greedy ignores the seed and the nucleus settings
    again = generate_token_grid(model, tok, PROMPT, 256, 256, settings=ARSampling(seed=5, temperature=0, top_p=0.1),
                                progress=False)
    assert torch.equal(again.ids, grid.ids)


def test_fused_kernel_path_gives_the_reference_tokens(release):
    _, _, model, tok = release
    want = _edit(model, tok, num_images=2, options=RunOptions(kernels="reference"))
    # every custom op, with the torch reference inside on CPU
    got = _edit(model, tok, num_images=2, options=RunOptions(kernels="fused"))
    assert torch.equal(got.ids, want.ids)
    ids = torch.randint(0, 16000, (1, 9))
    positions = torch.randint(0, 30, (3, 1, 9))
    with torch.no_grad():
        ref = model(ids, positions, model.new_cache(1, 9), 0, options=RunOptions(kernels="reference"))
        fused = model(ids, positions, model.new_cache(1, 9), 0, options=RunOptions(kernels="fused"))
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("temperature", [0.9, 0.0])
def test_compiled_step_gives_the_eager_tokens(release, temperature):
    _, _, model, tok = release
    torch._dynamo.reset()
    eager = _edit(model, tok, temperature=temperature, num_images=2)
    compiled = _edit(model, tok, temperature=temperature, num_images=2, decode_steps="compiled")  # fullgraph=True
    assert torch.equal(compiled.ids, eager.ids)
    if temperature:
        assert not torch.equal(eager.ids[0], eager.ids[1])
        assert not torch.equal(_edit(model, tok, seed=8, decode_steps="compiled").ids, eager.ids[:1])


def test_decode_steps_choice_is_checked(release):
    _, _, model, tok = release
    with pytest.raises(ValueError, match="decode_steps must be one of eager, cuda graph, compiled"):
        _edit(model, tok, decode_steps="fast")
    # without CUDA, "cuda graph" runs the eager step
    assert torch.equal(_edit(model, tok, decode_steps="cuda graph").ids, _edit(model, tok).ids)


def test_step_runner_replays_one_graph_per_token(monkeypatch):
    """The CUDA path's bookkeeping with stand-ins for the CUDA calls: two warm-up steps, one capture, then one
    replay per token and no other step call."""
    from glm_image_nodes.core.stages import ar_sampling
    events = []

    class Graph:
        def replay(self):
            events.append("replay")

    class Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            events.append("capture")

        def __exit__(self, *exc):
            return False

    class Stream:
        def wait_stream(self, other):
            pass

    fake = type("cuda", (), dict(CUDAGraph=Graph, graph=Capture, Stream=Stream, current_stream=Stream,
                                 stream=lambda s: Capture(None)))
    monkeypatch.setattr(ar_sampling.torch, "cuda", fake)
    run = ar_sampling.StepRunner("cuda graph", torch.device("cuda"), lambda: events.append("step"))
    for _ in range(6):
        run()
    assert events == ["capture", "step", "capture", "step", "capture", "step"] + ["replay"] * 4
    eager = ar_sampling.StepRunner("cuda graph", torch.device("cpu"), lambda: events.append("cpu"))
    events.clear()
    eager()
    assert events == ["cpu"]
