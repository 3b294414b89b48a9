"""AR decode modes on CPU: ``compiled`` serves prompts of different lengths with one compiled step, falls back to
eager (same tokens, one log line) when torch's recompile limit is hit, and is refused (eager, one log line)
for a model whose layers patch their weights per call (ComfyUI's LowVramPatch)."""
import logging

import pytest
import torch
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.stages import decode_modes
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.settings import ARSampling
from tiny_glm_release import make_release

PROMPTS = ["a cat", "a red cat on a mat, the 32", "a cat with a hat and a long tail under a tree"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_release")
    torch.manual_seed(0)
    make_release(str(root))
    return load_ar_model(str(root), dtype="fp32", device="cpu"), load_text_tokenizer(str(root))


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(decode_modes, "_said", set())


def _grid(model, tok, prompt, **settings):
    return generate_token_grid(model, tok, prompt, 128, 128, ARSampling(seed=3, **settings), progress=False).ids


def _ours(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "glm_image_nodes"]


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_decode_needs_no_recompile_per_prompt_length_and_falls_back_past_the_limit(
        release, fresh_log, caplog):
    model, tok = release
    lengths = {len(tok.encode(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS) > 2  # more distinct lengths than the limit below
    torch._dynamo.reset()
    # config.patch, not monkeypatch: torch's config module hides a key that monkeypatch's undo sets back
    with torch._dynamo.config.patch(recompile_limit=2):
        before = _graphs()
        with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
            for prompt in PROMPTS:
                assert torch.equal(_grid(model, tok, prompt, decode_steps="compiled"), _grid(model, tok, prompt))
            assert _graphs() - before == 1  # one compiled step for every prompt length
            assert not _ours(caplog)
            # a second batch size is a second shape: with the limit at 1 the compile limit is hit -> eager
            with torch._dynamo.config.patch(recompile_limit=1):
                for _ in range(2):
                    got = _grid(model, tok, PROMPTS[0], decode_steps="compiled", num_images=2)
                    assert torch.equal(got, _grid(model, tok, PROMPTS[0], num_images=2))
    messages = _ours(caplog)
    assert len(messages) == 1 and "recompile limit" in messages[0], messages


def test_capture_is_refused_for_per_call_weight_patches(release, fresh_log, caplog):
    model, tok = release
    want = _grid(model, tok, PROMPTS[1])
    layer = model.layers[0].mlp.down_proj
    layer.weight_function.append(lambda w: w.clone())  # what ComfyUI's LowVramPatch looks like to a layer
    try:
        torch._dynamo.reset()
        before = _graphs()
        with caplog.at_level(logging.WARNING, logger="glm_image_nodes"):
            for mode in ("compiled", "cuda graph"):
                assert torch.equal(_grid(model, tok, PROMPTS[1], decode_steps=mode), want)
        assert _graphs() == before  # nothing compiled
    finally:
        layer.weight_function.clear()
    message, = _ours(caplog)
    assert "refused" in message and "layers.0.mlp.down_proj" in message
    assert decode_modes.steps_for(model, "compiled", torch.device("cpu")) == "compiled"


class LowVramPatch:  # the name ComfyUI's class has (comfy.model_patcher.LowVramPatch)
    def __call__(self, weight):
        return weight.clone()


class PackedWeightPatch(LowVramPatch):  # what PackModelPatcher puts in a fully loaded FP8/GGUF layer
    pass


def test_comfy_patches_in_the_packs_own_list_are_refused_and_its_own_lora_is_not(release):
    model, _ = release
    layer = model.layers[1].self_attn.o_proj
    layer.weight_patches.append(PackedWeightPatch())
    try:
        assert decode_modes.per_call_weight_patches(model) == ["layers.1.self_attn.o_proj"]
    finally:
        layer.weight_patches.clear()
    layer.weight_patches.append(lambda w: w + 1)  # the pack's own LoRA patch: factors kept on the device
    try:
        assert decode_modes.per_call_weight_patches(model) == []
    finally:
        layer.weight_patches.clear()


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_the_memory_reserved_before_placement_is_what_the_generation_allocates(release, monkeypatch, mode):
    """What the AR node passes to ComfyUI's load_models_gpu (memory_required) before the capture decision."""
    from glm_image_nodes.core.stages import ar_sampling
    model, tok = release
    seen = []
    monkeypatch.setattr(ar_sampling, "check_prefill_fits",
                        lambda m, *args, device: seen.append(m.generation_bytes(*args)))
    monkeypatch.setattr(ar_sampling, "compiled_decode_step", lambda: ar_sampling.decode_step)  # no compile here
    prompts = [PROMPTS[0], PROMPTS[2]]  # left padding
    settings = ARSampling(seed=0, num_images=2, decode_steps=mode)
    ar_sampling.generate_token_grid(model, tok, prompts, 128, 128, settings, progress=False)
    reserved = ar_sampling.generation_memory(model, tok, prompts, 128, 128, settings)
    assert seen == [reserved] and reserved > 0
