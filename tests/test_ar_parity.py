"""GLM-Image AR model, loader and sampler against transformers' GlmImageForConditionalGeneration (fp32, CPU).

Logits parity: transformers' own ``generate`` (its processor inputs, get_rope_index, cached decode positions,
DynamicCache) greedily writes tokens and returns its raw per-step logits; the same tokens are teacher-forced
through our static KV cache one step at a time and every step's logits are compared.
"""
import os

import pytest
import torch
from glm_image_nodes.core.formats import reading
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.host import interrupts
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.stages.ar_prompt import build_ar_inputs, load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import filter_logits, generate_token_grid
from glm_image_nodes.core.stages.settings import ARSampling
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_glm_release import TEXT_CONFIG, make_model, make_release

LOGITS_ATOL = 2e-5   # fp32; measured 2.4e-6 .. 4.0e-6 on logits of magnitude 5-6


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
    assert len(list((root / "vision_language_encoder").glob("*.safetensors"))) > 1  # sharded, with an index
    assert list((root / "vision_language_encoder").glob("*.safetensors.index.json"))
    ref = {k: v for k, v in hf.state_dict().items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    ours = model.state_dict()
    assert len(ours) == len(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k.removeprefix("model.language_model.")], v), k

    read = []
    real_safe_open = reading.safe_open

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

        def get_slice(self, key):  # header only
            return self.sf.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.sf.get_tensor(key)

    monkeypatch.setattr(reading, "safe_open", Recording)
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


def test_single_file_without_config_is_inferred(tmp_path):
    """Release geometry per head (head_dim 128, rotary 64, sections [8, 12, 12]); sizes read from shapes."""
    text = dict(TEXT_CONFIG, vocab_size=16640, pad_token_id=0, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, head_dim=128,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [8, 12, 12]})
    hf = make_model(text)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, str(tmp_path / "ar.safetensors"))
    model = load_ar_model(str(tmp_path / "ar.safetensors"), dtype="fp32", device="cpu")
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (3, 2, 1, 128, 96)
    ids = torch.randint(0, 16640, (1, 9))
    positions = torch.randint(0, 50, (3, 1, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions).logits
        ours = model(ids, positions, model.new_cache(1, 9), 0)
    err = (ours - ref).abs().max().item()
    assert ref.abs().max() > 1 and err < LOGITS_ATOL, err


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
    prompt = "a cat, the 32"
    tokens, ref_logits = _reference_run(hf, processor, [prompt], 256, 256, 24)
    inputs = build_ar_inputs(tok, [prompt], 256, 256)
    err = (_teacher_forced(model, inputs, tokens) - ref_logits).abs().max().item()
    assert ref_logits.abs().max() > 1 and err < LOGITS_ATOL, err

    # The whole walk (16x16 preview, then the 8x8 grid: 320 tokens) in one transformers forward, at the
    # decode positions its get_rope_index cached during generate; ours step by step through the cache.
    assert inputs.num_new_tokens == 320
    ref_decode = hf.model._cached_decode_position_ids.permute(1, 0, 2)
    tokens = torch.randint(0, 16512, (1, 320))
    ref_positions, _ = hf.model.get_rope_index(inputs.input_ids, image_grid_thw=torch.tensor([[1, 8, 8], [1, 16, 16]]))
    with torch.no_grad():
        ref_logits = hf(input_ids=torch.cat([inputs.input_ids, tokens[:, :-1]], dim=1),
                        position_ids=torch.cat([ref_positions, ref_decode[:, :, :319]], dim=2)).logits
    ref_logits = ref_logits[:, inputs.input_ids.shape[1] - 1:]
    err_walk = (_teacher_forced(model, inputs, tokens) - ref_logits).abs().max().item()
    assert err_walk < LOGITS_ATOL, err_walk


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


def _edit(model, tok, seed, size=128, **settings):
    """Editing mode writes only the target grid (no ~256-token preview), which keeps these tests short."""
    sources = [torch.arange(16).view(4, 4) * 1000]
    return generate_token_grid(model, tok, "make it blue", size, size, ARSampling(seed=seed, **settings),
                               source_grids=sources)


def test_batched_sampling_writes_exactly_the_grid_of_codebook_ids(release):
    _, _, _, model, tok = release
    head = model.lm_head
    model.lm_head = _EosBias(head)
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    try:
        assert model(torch.tensor([[5]]), torch.zeros(3, 1, 1, dtype=torch.long), model.new_cache(1, 1), 0
                     ).argmax().item() == 16385
        calls.clear()
        grid = generate_token_grid(model, tok, ["a cat", "a much longer prompt about 32 dogs"], 128, 96,
                                   settings=ARSampling(seed=1))
    finally:
        hook.remove()
        model.lm_head = head
    assert grid.ids.shape == (2, 4, 3) and grid.preview.shape == (2, 18, 13)
    assert (grid.height, grid.width) == (128, 96)
    assert grid.ids.max() < 16384 and grid.preview.max() < 16384 and grid.ids.min() >= 0
    # one prefill for the whole batch, then one single-token step per remaining token
    assert len(calls) == 18 * 13 + 4 * 3 and calls[0][0] == 2 and all(c == (2, 1) for c in calls[1:])


def test_seeds_and_editing(release):
    _, _, _, model, tok = release
    first, same, other = _edit(model, tok, 7), _edit(model, tok, 7), _edit(model, tok, 8)
    assert first.ids.shape == (1, 4, 4) and first.preview is None and first.ids.max() < 16384
    assert torch.equal(first.ids, same.ids) and not torch.equal(first.ids, other.ids)
    pair = _edit(model, tok, 7, num_images=2, top_k=50, top_p=0.9, temperature=1.1)
    assert pair.ids.shape == (2, 4, 4) and not torch.equal(pair.ids[0], pair.ids[1])


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
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
    before = _edit(model, tok, 5)
    steps = []

    def interrupt_at_step_6(module, args, output):
        steps.append(1)
        if len(steps) == 6:
            interrupts.request_interrupt()

    hook = model.register_forward_hook(interrupt_at_step_6)
    try:
        with pytest.raises(interrupts.Interrupted):
            _edit(model, tok, 5)
    finally:
        hook.remove()
    assert len(steps) == 6
    assert torch.equal(_edit(model, tok, 5).ids, before.ids)


def test_bad_sampling_arguments(release):
    _, _, _, model, tok = release
    with pytest.raises(ValueError, match="at least 32"):
        generate_token_grid(model, tok, "a cat", 16, 1024, settings=ARSampling(seed=0))
    with pytest.raises(ValueError, match="temperature"):
        generate_token_grid(model, tok, "a cat", 64, 64, settings=ARSampling(seed=0, temperature=-0.1))
    with pytest.raises(ValueError, match="top_p"):
        generate_token_grid(model, tok, "a cat", 64, 64, settings=ARSampling(seed=0, top_p=0))


def test_prompt_longer_than_the_context_is_refused(release):
    _, _, _, model, tok = release
    context = model.config.max_position_embeddings
    model.config.max_position_embeddings = 300
    try:
        with pytest.raises(ValueError, match="over the model's context of 300 tokens: shorten the prompt"):
            generate_token_grid(model, tok, "a cat " * 40, 256, 256, settings=ARSampling(seed=0))
    finally:
        model.config.max_position_embeddings = context
