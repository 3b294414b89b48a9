"""LoRA parity with the references (fp32, tiny random models, CPU): peft on transformers'
GlmImageForConditionalGeneration, diffusers' CogView4Pipeline.load_lora_weights, and peft through the
PeftAdapterMixin of diffusers' GlmImageTransformer2DModel, each against the pack with the LoRA the reference
saved; and the base model's output bit-identical before and after a LoRA ran on it."""
import os
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")
from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from glm_image_nodes.core.formats.lora_targets import AR, COGVIEW4_DIT, GLM_IMAGE_DIT, load_lora  # noqa: E402
from glm_image_nodes.core.loading.lora_patches import AppliedLora, installed  # noqa: E402
from glm_image_nodes.core.models.cogview4_dit import load_cogview4_decoder  # noqa: E402
from glm_image_nodes.core.models.glm_ar import load_ar_model  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import load_decoder  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import sample_cogview4_latents  # noqa: E402
from glm_image_nodes.core.stages.settings import DecoderRun  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import SCHEDULER, single_thread, tiny_cogview4_dit, tiny_glm_image_dit, write_release  # noqa: E402
from tiny_glm_release import make_release  # noqa: E402

AR_TOL = 5e-5      # logits (magnitude ~5), max abs
DIT_TOL = 1e-5     # velocity, max abs
SAMPLE_TOL = 2e-5  # latents after 3 steps with CFG, max abs
FIGURES = {}       # measured max abs errors, printed at the end of the module (pytest -s)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nLoRA parity, max abs error: " + ", ".join(f"{k} {v:.2e}" for k, v in FIGURES.items()))


def record(name, got, want, tol):
    err = (got - want).abs().max().item()
    FIGURES[name] = err
    assert err <= tol, (name, err)
    return err


# ---- the AR model: peft on GlmImageForConditionalGeneration -------------------------------------------------------
@pytest.fixture(scope="module")
def ar(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar_release")
    torch.manual_seed(0)
    hf, _ = make_release(str(root))  # the base, saved before peft wraps it
    model = load_ar_model(str(root), dtype="fp32", device="cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random non-zero A and B
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
    peft_model = get_peft_model(hf, config)
    adapter = str(tmp_path_factory.mktemp("ar_lora"))
    peft_model.save_pretrained(adapter)
    return model, peft_model, load_lora(adapter, AR, model)


def ar_inputs():
    ids = torch.randint(0, 16512, (1, 12), generator=torch.Generator().manual_seed(3))
    return ids, torch.arange(12).view(1, 1, 12).expand(3, 1, 12)


def reference_logits(hf, ids, positions):
    with torch.no_grad():
        hidden = hf.model.language_model(input_ids=ids, position_ids=positions).last_hidden_state
        return hf.lm_head(hidden).float()


def pack_logits(model, ids, positions, loras=()):
    with torch.no_grad(), installed(model, loras):
        return model(ids, positions, model.new_cache(1, ids.shape[1]), 0)


def test_ar_lora_matches_peft(ar):
    model, peft_model, lora = ar
    ids, positions = ar_inputs()
    hf = peft_model.base_model.model
    base = pack_logits(model, ids, positions)
    for module in hf.modules():  # strength 0.5 against the adapter scaled by 0.5
        if isinstance(module, LoraLayer):
            module.scale_layer(0.5)
    half = reference_logits(hf, ids, positions)
    for module in hf.modules():
        if isinstance(module, LoraLayer):
            module.unscale_layer()
    record("AR strength 0.5 vs peft scaled 0.5", pack_logits(model, ids, positions, [AppliedLora(lora, 0.5)]), half,
           AR_TOL)
    merged = reference_logits(peft_model.merge_and_unload(), ids, positions)
    full = pack_logits(model, ids, positions, [AppliedLora(lora, 1.0)])
    record("AR strength 1 vs peft merge_and_unload", full, merged, AR_TOL)
    assert (merged - base).abs().max() > 100 * AR_TOL  # the LoRA changes the logits
    # the base after the LoRA ran: bit-identical, and no patch left on any layer
    assert torch.equal(pack_logits(model, ids, positions), base)
    assert not any(getattr(m, "weight_patches", None) for m in model.modules())


# ---- CogView4: CogView4Pipeline.load_lora_weights with a LoRA saved by save_lora_weights ---------------------------
def cogview4_pipeline(transformer):
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cogview4_lora_matches_load_lora_weights(tmp_path):
    base_ref = tiny_cogview4_dit(seed=2)
    dit = load_cogview4_decoder(write_release(str(tmp_path / "release"), base_ref, "CogView4Pipeline"), "fp32", "cpu")
    trained = tiny_cogview4_dit(seed=2)
    torch.manual_seed(4)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"]))
    CogView4Pipeline.save_lora_weights(str(tmp_path / "lora"),
                                       transformer_lora_layers=get_peft_model_state_dict(trained),
                                       transformer_lora_adapter_metadata=trained.peft_config["default"].to_dict())
    lora = load_lora(str(tmp_path / "lora"), COGVIEW4_DIT, dit)
    assert lora.format == "diffusers LoRA" and len(lora.layers) == 14

    pipe = cogview4_pipeline(base_ref)
    pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="style")
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 9, 48, generator=g), torch.randn(1, 4, 48, generator=g)
    args = dict(height=64, width=96, num_inference_steps=3, guidance_scale=4.0)

    def reference():
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=torch.Generator().manual_seed(8),
                        output_type="latent", return_dict=False, **args)[0]

    def ours(strength):
        with installed(dit, [AppliedLora(lora, strength)]):
            return sample_cogview4_latents(dit, cond, uncond, 64, 96, settings=DecoderRun(steps=3, guidance=4.0,
                                                                                          seed=8), progress=False)

    record("CogView4 latents, strength 1 vs load_lora_weights", ours(1.0), reference(), SAMPLE_TOL)
    pipe.set_adapters(["style"], [-0.7])
    record("CogView4 latents, strength -0.7 vs set_adapters(-0.7)", ours(-0.7), reference(), SAMPLE_TOL)


# ---- GLM-Image DiT: peft through GlmImageTransformer2DModel's PeftAdapterMixin ------------------------------------
def glm_inputs(b=2, h=8, w=12):
    g = torch.Generator().manual_seed(1)
    n = (h // 2) * (w // 2)
    return dict(latents=torch.randn(b, 16, h, w, generator=g), glyph=torch.randn(b, 5, 32, generator=g),
                ids=torch.randint(0, 64, (b, n), generator=g), t=torch.tensor([999.0, 420.0][:b]),
                size=torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1), crop=torch.tensor([[0.0, 16.0]]).repeat(b, 1))


def glm_reference(ref, x):
    with torch.no_grad():
        drop = torch.zeros_like(x["ids"], dtype=torch.bool)
        return ref(x["latents"], x["glyph"], x["ids"], drop, x["t"], x["size"], x["crop"], return_dict=False)[0]


def glm_pack(dit, x, loras=()):
    with torch.no_grad(), installed(dit, loras):
        return dit(x["latents"], x["glyph"], x["ids"], False, x["t"], x["size"], x["crop"])


def test_glm_image_dit_lora_matches_peft_adapter(tmp_path):
    ref = tiny_glm_image_dit()
    dit = load_decoder(write_release(str(tmp_path / "release"), ref, "GlmImagePipeline"), "fp32", "cpu")
    x = glm_inputs()
    base = glm_pack(dit, x)
    torch.manual_seed(6)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "prior_projector.net.2",
        "proj_out"]))
    ref.save_lora_adapter(str(tmp_path / "lora"))
    lora = load_lora(str(tmp_path / "lora"), GLM_IMAGE_DIT, dit)
    assert len(lora.layers) == 16 and {layer.scale for layer in lora.layers.values()} == {6 / 2}  # rsLoRA: 6/sqrt(4)
    want = glm_reference(ref, x)
    record("GLM-Image DiT velocity vs the peft adapter", glm_pack(dit, x, [AppliedLora(lora, 1.0)]), want, DIT_TOL)
    assert (want - base).abs().max() > 100 * DIT_TOL

    # the same LoRA in kohya's layout, converted by diffusers' own converter (alpha = 6 * sqrt(4): the rsLoRA scale)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(ref).items()})
    kohya = {k: (torch.tensor(12.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    assert all(k.startswith("lora_unet_transformer_blocks_") or k.startswith("lora_unet_p") for k in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    kohya_lora = load_lora(str(tmp_path / "kohya.safetensors"), GLM_IMAGE_DIT, dit)
    record("GLM-Image DiT velocity, kohya keys vs the peft adapter",
           glm_pack(dit, x, [AppliedLora(kohya_lora, 1.0)]), want, DIT_TOL)
    assert torch.equal(glm_pack(dit, x), base)
