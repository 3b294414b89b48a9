"""GLM-Image AR model, loader and sampler against transformers' GlmImageForConditionalGeneration (fp32, CPU).

Logits parity: transformers' own ``generate`` (its processor inputs, get_rope_index, cached decode positions,
DynamicCache) greedily writes tokens and returns its raw per-step logits; the same tokens are teacher-forced
through our static KV cache one step at a time and every step's logits are compared.
"""
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_glm_release import make_release

from glm_image_nodes.core import comfy_compat, loading
from glm_image_nodes.core.ar_prompt import build_ar_inputs, load_text_tokenizer
from glm_image_nodes.core.ar_sampling import filter_logits, generate_token_grid
from glm_image_nodes.core.glm_ar import load_ar_model
from glm_image_nodes.core.loading import CheckpointError

LOGITS_ATOL = 1e-4   # fp32; measured ~4e-6 on logits of magnitude ~7


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_release")
    torch.manual_seed(0)
    hf, processor = make_release(str(root))
    model = load_ar_model(str(root), dtype="fp32", device="cpu")
    return root, hf, processor, model, load_text_tokenizer(str(root))


def _reference_run(hf, processor, prompts, height, width, steps, images=None):
    messages = []
    for i, p in enumerate(prompts):
        content = [{"type": "image", "image": im} for im in (images or [])]
        messages.append([{"role": "user", "content": content + [{"type": "text", "text": p}]}])
    inputs = processor.apply_chat_template(messages, tokenize=True, padding=len(prompts) > 1, target_h=height,
                                           target_w=width, return_dict=True, return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@torch.inference_mode()
def _teacher_forced(model, inputs, tokens):
    """Prefill, then feed ``tokens`` [B,K] one at a time through the static cache; logits [B,K,V]."""
    b, length = inputs.input_ids.shape
    k_steps = tokens.shape[1]
    cache = model.new_cache(b, length + k_steps, inputs.attention_mask)
    logits = [model(inputs.input_ids, inputs.position_ids, cache, 0)[:, -1]]
    index = torch.tensor(length)
    for k in range(k_steps - 1):
        logits.append(model(tokens[:, k:k + 1], inputs.decode_position_ids[:, :, k:k + 1], cache, index)[:, -1])
        index += 1
    return torch.stack(logits, dim=1)


def test_loader_paths_and_weights(release, tmp_path, monkeypatch):
    root, hf, _, model, _ = release
    ref = {k: v for k, v in hf.state_dict().items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    ours = model.state_dict()
    assert len(ours) == len(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k.removeprefix("model.language_model.")], v), k

    read = []
    real_safe_open = loading.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.inner = real_safe_open(*a, **kw)

        def __enter__(self):
            self.sf = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.sf.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.sf.get_tensor(key)

    monkeypatch.setattr(loading, "safe_open", Recording)
    folder = load_ar_model(str(root / "vision_language_encoder"), dtype="fp32", device="cpu")
    assert len(read) == len(ref) and not any(k.startswith(("model.visual", "model.vqmodel")) for k in read)
    monkeypatch.undo()
    assert torch.equal(folder.lm_head.weight, model.lm_head.weight)

    # a single safetensors file with the config beside it
    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(single / "glm_image_ar.safetensors"))
    (single / "config.json").write_text((root / "vision_language_encoder" / "config.json").read_text())
    one = load_ar_model(str(single / "glm_image_ar.safetensors"), dtype="fp32", device="cpu")
    assert torch.equal(one.layers[1].mlp.gate_up_proj.weight, model.layers[1].mlp.gate_up_proj.weight)
    # without a config the release's head_dim (128) is assumed, which this tiny checkpoint cannot have
    os.remove(single / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_ar_model(str(single / "glm_image_ar.safetensors"), dtype="fp32", device="cpu")


def test_loader_errors(release, tmp_path):
    root = release[0]
    with pytest.raises(CheckpointError, match="fp16"):
        load_ar_model(str(root), dtype="fp16", device="cpu")
    folder = tmp_path / "vision_only"
    folder.mkdir()
    (folder / "config.json").write_text((root / "vision_language_encoder" / "config.json").read_text())
    tensors = {}
    for f in sorted((root / "vision_language_encoder").glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(str(f)).items() if k.startswith("model.visual")})
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no GLM-Image language-model weights"):
        load_ar_model(str(folder), dtype="fp32", device="cpu")


def test_text_to_image_logits_match_transformers(release):
    _, hf, processor, model, tok = release
    # 256x256: 16x16 preview + 8x8 grid = 320 tokens, so the walk crosses from the preview into the grid
    steps = 320
    tokens, ref_logits = _reference_run(hf, processor, ["a cat, the 32"], 256, 256, steps)
    inputs = build_ar_inputs(tok, ["a cat, the 32"], 256, 256)
    assert inputs.num_new_tokens == steps
    logits = _teacher_forced(model, inputs, tokens)
    err = (logits - ref_logits).abs().max().item()
    assert ref_logits.abs().max() > 1 and err < LOGITS_ATOL, err


def test_padded_batch_logits_match_transformers(release):
    _, hf, processor, model, tok = release
    prompts = ["a cat", "the 32 cats on a mat, watercolor"]
    tokens, ref_logits = _reference_run(hf, processor, prompts, 128, 96, 12)
    inputs = build_ar_inputs(tok, prompts, 128, 96)
    assert inputs.attention_mask[0, 0] == 0
    err = (_teacher_forced(model, inputs, tokens) - ref_logits).abs().max().item()
    assert err < LOGITS_ATOL, err


def test_image_to_image_logits_match_transformers(release):
    """transformers runs its real i2i path (processor placeholders, vision encoder, masked_scatter); only its VQ
    lookup ``get_image_tokens`` is replaced to return our chosen source ids."""
    _, hf, processor, model, tok = release
    sources = [torch.randint(0, 16384, (2, 3)), torch.randint(0, 16384, (3, 2))]
    images = [Image.new("RGB", (96, 64), (200, 10, 10)), Image.new("RGB", (64, 96), (10, 10, 200))]
    chosen = torch.cat([s.flatten() for s in sources])
    hf.model.get_image_tokens = lambda hidden_states, image_grid_thw=None: chosen
    try:
        tokens, ref_logits = _reference_run(hf, processor, ["make it blue"], 128, 96, 12, images=images)
    finally:
        del hf.model.get_image_tokens
    inputs = build_ar_inputs(tok, ["make it blue"], 128, 96, source_grids=sources)
    assert inputs.num_new_tokens == 12
    err = (_teacher_forced(model, inputs, tokens) - ref_logits).abs().max().item()
    assert err < LOGITS_ATOL, err


class _EosBias(torch.nn.Module):
    """lm_head that makes end-of-image (16385) and a reserved id overwhelmingly likely."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.weight = head.weight

    def forward(self, x):
        out = self.head(x)
        out[..., 16385] += 1e4
        out[..., 16400] += 5e3
        return out


def test_sampling_count_codebook_only_and_seeds(release, monkeypatch):
    _, _, _, model, tok = release
    monkeypatch.setattr(model, "lm_head", _EosBias(model.lm_head))
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        grid = generate_token_grid(model, tok, "a cat", 128, 96, seed=1, num_images=2)
    finally:
        hook.remove()
    assert grid.ids.shape == (2, 4, 3) and grid.preview.shape == (2, 18, 13)
    assert (grid.height, grid.width) == (128, 96)
    assert grid.ids.max() < 16384 and grid.preview.max() < 16384 and grid.ids.min() >= 0
    # one prefill for the batch, then one single-token step per remaining token
    assert len(calls) == 18 * 13 + 4 * 3 and calls[0][0] == 2 and all(c == (2, 1) for c in calls[1:])

    monkeypatch.undo()
    again = generate_token_grid(model, tok, "a cat", 128, 96, seed=7, top_p=1.0)
    same = generate_token_grid(model, tok, "a cat", 128, 96, seed=7, top_p=1.0)
    other = generate_token_grid(model, tok, "a cat", 128, 96, seed=8, top_p=1.0)
    assert torch.equal(again.ids, same.ids) and torch.equal(again.preview, same.preview)
    assert not torch.equal(torch.cat([again.preview.flatten(), again.ids.flatten()]),
                           torch.cat([other.preview.flatten(), other.ids.flatten()]))


def test_batch_of_prompts_and_editing(release):
    _, _, _, model, tok = release
    grid = generate_token_grid(model, tok, ["a cat", "a much longer prompt about 32 dogs"], 64, 96, seed=3,
                               num_images=2)
    assert grid.ids.shape == (4, 2, 3) and grid.preview.shape[0] == 4
    edit = generate_token_grid(model, tok, "make it blue", 64, 64, seed=3,
                               source_grids=[torch.randint(0, 16384, (2, 2))])
    assert edit.ids.shape == (1, 2, 2) and edit.preview is None and edit.ids.max() < 16384


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(3, 500) * 3
    for temperature, top_k, top_p in [(0.9, 16512, 0.75), (0.7, 20, 0.9), (1.3, 5, 1.0), (1.0, 500, 0.3)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits) if temperature != 1.0 else logits
        ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(filter_logits(logits, temperature, top_k, top_p), ref)
    # by hand: probabilities 0.5, 0.3, 0.15, 0.05 with top_p 0.75 keep the token that crosses 0.75
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = filter_logits(probs.log(), 1.0, 16512, 0.75).isfinite()
    assert kept.tolist() == [[False, True, False, True]]
    assert filter_logits(probs.log(), 1.0, 3, 1.0).isfinite().tolist() == [[True, True, False, True]]


def test_interrupt_raises_and_model_stays_usable(release):
    _, _, _, model, tok = release
    before = generate_token_grid(model, tok, "a cat", 64, 64, seed=5)
    steps = []

    def interrupt_at_step_10(module, args, output):
        steps.append(1)
        if len(steps) == 10:
            comfy_compat.request_interrupt()

    hook = model.register_forward_hook(interrupt_at_step_10)
    try:
        with pytest.raises(comfy_compat.Interrupted):
            generate_token_grid(model, tok, "a cat", 64, 64, seed=5)
    finally:
        hook.remove()
    assert len(steps) == 10
    after = generate_token_grid(model, tok, "a cat", 64, 64, seed=5)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.preview, after.preview)


def test_bad_sampling_arguments(release):
    _, _, _, model, tok = release
    with pytest.raises(ValueError, match="at least 32"):
        generate_token_grid(model, tok, "a cat", 16, 1024, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_token_grid(model, tok, "a cat", 64, 64, seed=0, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate_token_grid(model, tok, "a cat", 64, 64, seed=0, top_p=0)
