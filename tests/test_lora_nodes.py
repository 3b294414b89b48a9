"""The LoRA nodes outside ComfyUI: ComfyUI's patch semantics (a new handle per LoRA node, stacking, any strength,
the shared base model unchanged: a branch without the LoRA gives the base output bit for bit), LoRA on FP8 and
GGUF weights (the delta on the dequantized weight of each layer, the stored weights untouched), and the example
workflow run in-process."""
import json
import os

import pytest
import torch
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.formats.lora_targets import AR, GLM_IMAGE_DIT, load_lora
from glm_image_nodes.core.loading.lora_patches import AppliedLora, installed
from glm_image_nodes.core.models import glm_image_dit
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.core.runtime.options import RunOptions
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.decoder_sampling import sample_latents as decode
from glm_image_nodes.core.stages.handles import GlyphConditioning, TokenGrid
from glm_image_nodes.core.stages.settings import ARSampling, DecoderRun
from glm_image_nodes.headless.executor import Executor
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
from glm_image_nodes.nodes.loaders.glm_image import GLMImageARLoader, GLMImageDecoderLoader
from glm_image_nodes.nodes.loaders.lora import GLMImageARLoraLoader, GLMImageDecoderLoraLoader
from glm_image_nodes.nodes.sampling.ar import GLMImageARSampler
from glm_image_nodes.nodes.sampling.decoder import GLMImageDecoderSampler
from glm_image_nodes.testing.layer_kinds import packed_layers
from glm_image_nodes.testing.tiny_lora import write_tiny_loras
from glm_image_nodes.testing.tiny_release import write_tiny_release
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTIZED_TOL = 1e-5  # velocity, max abs: the same dequantized weights with the same delta, fp32


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = write_tiny_release(str(tmp_path_factory.mktemp("release")))
    return root, write_tiny_loras(root, str(tmp_path_factory.mktemp("loras")))


@pytest.fixture(scope="module")
def handles(release):
    root, _ = release
    return GLMImageARLoader().load(root, "fp32")[0], GLMImageDecoderLoader().load(root, "fp32")[0]


def no_patches(model):
    return not any(getattr(m, "weight_patches", None) for m in model.modules())


def test_a_lora_node_returns_a_new_handle_and_they_stack(release, handles):
    _, loras = release
    ar, _ = handles
    first, = GLMImageARLoraLoader().load(lora_name=loras["ar"], strength=0.5, ar_model=ar)
    second, = GLMImageARLoraLoader().load(lora_name=loras["ar"], strength=-1.5, ar_model=first)
    assert ar.loras == () and [a.strength for a in first.loras] == [0.5]
    assert [a.strength for a in second.loras] == [0.5, -1.5]
    assert second.base is ar and second.model is ar.model and second.tokenizer is ar.tokenizer
    assert GLMImageARLoraLoader().load(lora_name=loras["ar"], strength=0.0, ar_model=ar)[0] is ar
    with pytest.raises(ValueError, match="strength must be a finite number"):
        GLMImageARLoraLoader().load(lora_name=loras["ar"], strength=float("nan"), ar_model=ar)
    with pytest.raises(FileNotFoundError, match="LoRA 'nowhere.safetensors' not found. Put it in models/loras/"):
        GLMImageARLoraLoader().load(lora_name="nowhere.safetensors", strength=1.0, ar_model=ar)
    assert no_patches(ar.model)  # nothing is applied until a sampler runs


def sample_tokens(ar):
    return GLMImageARSampler().sample(ar, "a red door", 512, 512, seed=3, temperature=0.9, top_p=0.75, top_k=16512,
                                      num_images=1)[0].ids


def sample_latents(decoder, tokens):
    glyph = GlyphConditioning(cond=torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1)),
                              uncond=torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(2)))
    return GLMImageDecoderSampler().sample(decoder, tokens, glyph, seed=5, steps=2, guidance=1.5)[0]["samples"]


def test_branches_with_and_without_the_lora(release, handles):
    _, loras = release
    ar, decoder = handles
    ar_lora, = GLMImageARLoraLoader().load(lora_name=loras["ar"], strength=2.0, ar_model=ar)
    dit_lora, = GLMImageDecoderLoraLoader().load(lora_name=loras["dit"], strength=1.0, decoder=decoder)
    state = {k: v.clone() for k, v in ar.model.state_dict().items()}

    base_tokens = sample_tokens(ar)
    assert not torch.equal(sample_tokens(ar_lora), base_tokens)
    assert torch.equal(sample_tokens(ar), base_tokens)  # the branch without the LoRA, after it ran
    grid = TokenGrid(ids=base_tokens, height=512, width=512)
    base_latents = sample_latents(decoder, grid)
    assert (sample_latents(dit_lora, grid) - base_latents).abs().max() > 1e-3
    assert torch.equal(sample_latents(decoder, grid), base_latents)
    assert all(torch.equal(v, state[k]) for k, v in ar.model.state_dict().items())
    assert no_patches(ar.model) and no_patches(decoder.model)


def velocity(dit, loras=()):
    g = torch.Generator().manual_seed(4)
    latents, glyph = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
    ids = torch.randint(0, 16384, (1, 16), generator=g)
    with torch.no_grad(), installed(dit, loras):
        return dit(latents, glyph, ids, False, torch.tensor([500.0]), torch.tensor([[64.0, 64.0]]),
                   torch.zeros(1, 2))


def test_strengths_stack_like_sums(release, handles):
    _, loras = release
    dit = handles[1].model
    lora = load_lora(loras["dit"], GLM_IMAGE_DIT, dit)
    base, double = velocity(dit), velocity(dit, [AppliedLora(lora, 2.0)])
    assert (double - base).abs().max() > 1e-2
    assert torch.allclose(velocity(dit, [AppliedLora(lora, 1.0), AppliedLora(lora, 1.0)]), double, atol=1e-5)
    assert torch.allclose(velocity(dit, [AppliedLora(lora, 0.7), AppliedLora(lora, -0.7)]), base, atol=1e-5)


def test_patches_are_removed_when_the_run_fails(release, handles):
    _, loras = release
    dit = handles[1].model
    lora = load_lora(loras["dit"], GLM_IMAGE_DIT, dit)
    with pytest.raises(RuntimeError, match="stopped"):
        with installed(dit, [AppliedLora(lora, 1.0)]):
            assert not no_patches(dit)
            raise RuntimeError("stopped")
    assert no_patches(dit)


def test_the_compiled_decode_step_applies_the_lora_and_drops_it_after(release, handles):
    _, loras = release
    ar = handles[0]
    lora = load_lora(loras["ar"], AR, ar.model)

    def edit(decode_steps="eager"):  # editing writes only a 4x4 grid: a short walk
        return generate_token_grid(ar.model, ar.tokenizer, "make it blue", 128, 128,
                                   ARSampling(seed=7, decode_steps=decode_steps), progress=False,
                                   source_grids=[torch.arange(16).view(4, 4) * 1000]).ids

    torch._dynamo.reset()
    base = edit()
    with installed(ar.model, [AppliedLora(lora, 3.0)]):
        eager = edit()
        assert torch.equal(edit(decode_steps="compiled"), eager)  # torch.compile(fullgraph=True) traces the patch
    assert not torch.equal(eager, base)
    assert torch.equal(edit(decode_steps="compiled"), base)  # the compiled step does not keep the LoRA


def test_the_compiled_dit_blocks_apply_the_lora_and_drop_it_after(release, handles):
    _, loras = release
    dit = handles[1].model
    lora = load_lora(loras["dit"], GLM_IMAGE_DIT, dit)
    glyph = GlyphConditioning(cond=torch.randn(1, 3, 32), uncond=torch.randn(1, 2, 32))
    ids = torch.randint(0, 16384, (1, 16 * 16))

    def latents(**options):
        return decode(dit, ids, glyph, 256, 256, DecoderRun(steps=2, seed=1), progress=False, **options)

    torch._dynamo.reset()
    base = latents(options=RunOptions(compile=True))
    with installed(dit, [AppliedLora(lora, 1.0)]):
        eager = latents()
        assert (latents(options=RunOptions(compile=True)) - eager).abs().max() <= 1e-5
    assert (eager - base).abs().max() > 1e-3
    assert (latents(options=RunOptions(compile=True)) - base).abs().max() == 0


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "fp8_e4m3fn"])
def test_lora_on_quantized_weights_patches_the_dequantized_weight(release, tmp_path, fmt):
    root, loras = release
    path = str(tmp_path / f"dit{conversion.extension(fmt)}")
    conversion.convert_component(glm_image_dit.SPEC, root, fmt, path)
    quantized = load_decoder(path, "fp32", "cpu")
    stored = {k: v.clone() for k, v in quantized.state_dict().items()}
    lora = load_lora(loras["dit"], GLM_IMAGE_DIT, quantized)
    kinds = {packed_layers(quantized)[name].weight_kind for name in lora.layers}
    assert kinds and "plain" not in kinds, kinds

    # the reference: the same dequantized weights as plain tensors, with the delta merged into them
    plain = load_decoder(root, "fp32", "cpu")
    plain_modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in packed_layers(quantized).items():
            weight = layer.compute_weight(torch.device("cpu"), torch.float32)
            if name in lora.layers:
                weight = weight + 0.8 * lora.layers[name].scale * (lora.layers[name].up @ lora.layers[name].down)
            plain_modules[name].weight.copy_(weight)
    got = velocity(quantized, [AppliedLora(lora, 0.8)])
    error = (got - velocity(plain)).abs().max().item()
    print(f"LoRA on {fmt} weights vs the same dequantized weights with the delta merged: max abs {error:.2e}")
    assert error <= QUANTIZED_TOL
    assert (got - velocity(quantized)).abs().max() > 1e-2
    for key, value in quantized.state_dict().items():  # never re-quantized: the stored weights are as loaded
        assert value.dtype == stored[key].dtype and torch.equal(value, stored[key]), key
    assert no_patches(quantized)


def test_the_lora_example_workflow_runs_in_process(release, tmp_path):
    root, loras = release
    with open(os.path.join(ROOT, "example_workflows", "api", "glm_image_lora.json"), encoding="utf-8") as f:
        graph = json.load(f)
    for node in graph.values():
        inputs = node["inputs"]
        if "checkpoint" in inputs:
            inputs["checkpoint"] = root
        if node["class_type"] == "GLMImageARSampler":
            inputs.update(width=512, height=512)
        if node["class_type"] == "GLMImageDecoderSampler":
            inputs["steps"] = 2
    graph["2"]["inputs"]["lora_name"] = loras["ar"]
    graph["5"]["inputs"]["lora_name"] = loras["dit"]
    with_lora = Executor(NODE_CLASS_MAPPINGS, str(tmp_path / "lora")).run(graph)
    for lora_node, model_node in (("2", "1"), ("5", "4")):  # bypassed: the loaders feed the samplers directly
        for node in graph.values():
            for name, value in node["inputs"].items():
                if value == [lora_node, 0]:
                    node["inputs"][name] = [model_node, 0]
        del graph[lora_node]
    without = Executor(NODE_CLASS_MAPPINGS, str(tmp_path / "base")).run(graph)
    with Image.open(with_lora[0]) as a, Image.open(without[0]) as b:
        assert a.size == b.size == (512, 512) and a.tobytes() != b.tobytes()
