"""CogView4 DiT and sampling vs diffusers' CogView4Transformer2DModel / CogView4Pipeline (fp32, tiny random)."""
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402
from glm_image_nodes.core.formats.reading import CheckpointError  # noqa: E402
from glm_image_nodes.core.models.cogview4_dit import load_cogview4_decoder  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import sample_cogview4_latents  # noqa: E402
from glm_image_nodes.core.stages.settings import DecoderRun  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dit import SCHEDULER, single_thread, tiny_cogview4_dit, write_release  # noqa: E402

TOL = 1e-5  # DiT forward, max abs
SAMPLE_TOL = 1e-5  # latents after 3-4 steps, max abs

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = tiny_cogview4_dit(seed=2)
    root = write_release(str(tmp_path_factory.mktemp("cogview4")), ref, "CogView4Pipeline")
    return ref, load_cogview4_decoder(root, dtype="fp32", device="cpu")


def embeds(b, length, seed):
    return torch.randn(b, length, 48, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,h,w", [(1, 8, 8), (1, 8, 12), (2, 12, 6)])
def test_forward_parity(models, b, h, w):
    ref, dit = models
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, 16, h, w, generator=g)
    text = embeds(b, 7, 3)
    t = torch.tensor([1000.0, 37.0][:b])
    original = torch.tensor([[h * 8.0 + 32, w * 8.0]]).repeat(b, 1)
    target = torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1)
    crop = torch.tensor([[16.0, 0.0]]).repeat(b, 1)
    with torch.no_grad():
        want = ref(latents, text, t, original, target, crop, return_dict=False)[0]
        got = dit(latents, text, t, original, target, crop)
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= TOL, err
    assert want.abs().max() > 0.1


def pipeline(ref):
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cond_len,uncond_len,batch,steps,guidance", [(9, 4, 1, 4, 5.0), (6, 6, 2, 3, 3.5),
                                                                      (5, 5, 1, 3, 1.0)])
def test_sampling_matches_pipeline(models, cond_len, uncond_len, batch, steps, guidance):
    # equal lengths run the two CFG branches as one batched forward
    ref, dit = models
    height, width = 64, 96
    cond, uncond = embeds(batch, cond_len, 5), embeds(batch, uncond_len, 6)
    with torch.no_grad():
        want = pipeline(ref)(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
                             num_inference_steps=steps, guidance_scale=guidance,
                             generator=torch.Generator("cpu").manual_seed(8), output_type="latent",
                             return_dict=False)[0]
    got = sample_cogview4_latents(dit, cond, uncond, height, width, settings=DecoderRun(steps=steps, guidance=guidance,
                                                                                        seed=8),
                                  progress=False)
    err = (got - want).abs().max().item()
    assert got.shape == (batch, 16, height // 8, width // 8) and err <= SAMPLE_TOL, err


def test_single_file_and_errors(models, tmp_path):
    ref = tiny_cogview4_dit(num_layers=3, attention_head_dim=128, num_attention_heads=1)
    path = str(tmp_path / "cogview4.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    dit = load_cogview4_decoder(path, dtype="fp32", device="cpu")
    assert len(dit.transformer_blocks) == 3 and dit.config.text_embed_dim == 48
    with pytest.raises(CheckpointError, match="fp16"):
        load_cogview4_decoder(path, dtype="fp16", device="cpu")
    with pytest.raises(CheckpointError, match="not a CogView4 DiT"):
        glm = str(tmp_path / "glm.safetensors")
        save_file({"image_projector.proj.weight": torch.zeros(4, 64)}, glm)
        load_cogview4_decoder(glm, dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="uncond_embeds"):
        sample_cogview4_latents(models[1], embeds(1, 3, 0), None, 64, 64, settings=DecoderRun(steps=1, guidance=5.0),
                                progress=False)
