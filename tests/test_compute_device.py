"""The compute device travels with the call: ``host.memory.on_compute_device`` yields it, the node passes it to
the stage (``device=``), and the stage computes there wherever the weights are (block swap, a partial load).
Nothing is written on the modules.

This machine has only a CPU, so two tricks stand in for a GPU: ``cpu:0`` is a device that differs from the
weights' ``cpu`` while the tensors moved there still work, and a model whose ``device`` property claims ``cuda``
stands for weights left on another device: a stage that fell back to it would fail or compute on the wrong one.
"""
import pytest
import torch
from glm_image_nodes.core.host import memory
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig
from glm_image_nodes.core.models.vae import AutoencoderKL, GlmVAE, VAEConfig
from glm_image_nodes.core.stages import decoder_sampling
from glm_image_nodes.core.stages.handles import Decoder, GlyphConditioning, ReferenceImages, TokenGrid
from glm_image_nodes.core.stages.settings import DecoderRun
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES

H = W = 64
ELSEWHERE = torch.device("cuda")  # where a model's weights claim to be in the tests below


def tiny_dit() -> GlmImageDiT:
    torch.manual_seed(0)
    config = GlmImageDiTConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                               time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=64)
    return GlmImageDiT(config).eval()


def tiny_vae() -> GlmVAE:
    torch.manual_seed(0)
    return GlmVAE(AutoencoderKL(VAEConfig(latent_channels=4, block_out_channels=(32,), norm_num_groups=8)).eval())


def glyph() -> GlyphConditioning:
    return GlyphConditioning(cond=torch.randn(1, 4, 32), uncond=torch.randn(1, 2, 32))


def prior_ids(height: int = H, width: int = W) -> torch.Tensor:
    return torch.randint(0, 64, (1, (height // 16) * (width // 16)), generator=torch.Generator().manual_seed(1))


def device_attributes(module: torch.nn.Module) -> list[str]:
    return [f"{name or 'root'}.{key}" for name, m in module.named_modules() for key in m.__dict__ if "device" in key]


def spy_forward(monkeypatch, cls, seen: list, module: torch.nn.Module | None = None):
    """Record the devices of the tensors every ``cls.forward`` receives, and any device attribute on ``module``."""
    real = cls.forward

    def forward(self, *args, **kwargs):
        seen.extend(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        assert not device_attributes(module if module is not None else self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)


def test_the_decoder_node_computes_on_the_placed_device_under_block_swap(monkeypatch):
    """The node runs its stage on the device ``on_compute_device`` yields, with two of the blocks swapped (left
    on the weights' device), and no module gets a device attribute for it."""
    compute = torch.device("cpu", 0)
    monkeypatch.setattr(memory, "get_device", lambda: compute)
    dit = tiny_dit()
    noise_devices, forward_devices = [], []
    real_noise = decoder_sampling.initial_noise
    monkeypatch.setattr(decoder_sampling, "initial_noise",
                        lambda shape, seed, noise, device: noise_devices.append(device) or
                        real_noise(shape, seed, noise, device))
    spy_forward(monkeypatch, GlmImageDiT, forward_devices)
    handle = Decoder(model=dit, block_swap=2, blocks="transformer_blocks")
    ids = torch.randint(0, 64, (1, H // 32, W // 32), generator=torch.Generator().manual_seed(1))
    tokens = TokenGrid(ids=ids, height=H, width=W)
    before = {name: set(m.__dict__) for name, m in dit.named_modules()}
    (latent,) = NODES["GLMImageDecoderSampler"]().sample(handle, tokens, glyph(), seed=0, steps=2, guidance=1.5)
    assert noise_devices == [compute]
    assert forward_devices and all(d.type == "cpu" for d in forward_devices)
    assert latent["samples"].shape == (1, 16, H // 8, W // 8) and torch.isfinite(latent["samples"]).all()
    assert {name: set(m.__dict__) for name, m in dit.named_modules()} == before
    assert all(p.device == torch.device("cpu") for p in dit.parameters())


def test_sampling_computes_on_the_given_device_not_where_the_weights_are(monkeypatch):
    """With the weights claiming to be elsewhere, the decoder loop (with a reference's K/V written first) and the
    VAE compute on the device passed down, and no module gets a device attribute."""
    dit, vae = tiny_dit(), tiny_vae()
    monkeypatch.setattr(GlmImageDiT, "device", property(lambda self: ELSEWHERE))
    monkeypatch.setattr(GlmVAE, "device", property(lambda self: ELSEWHERE))
    dit_seen, vae_seen = [], []
    spy_forward(monkeypatch, GlmImageDiT, dit_seen)
    spy_forward(monkeypatch, type(vae.model.decoder), vae_seen, vae.model)
    spy_forward(monkeypatch, type(vae.model.encoder), vae_seen, vae.model)
    here = torch.device("cpu")
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(2))
    reference_latent = vae.encode(image, device=here)
    references = ReferenceImages(latents=[torch.randn(1, 16, H // 8, W // 8)], prior_ids=[prior_ids()],
                                 token_ids=[], sizes=[(H, W)])
    latents = decoder_sampling.sample_latents(dit, prior_ids(), glyph(), H, W, DecoderRun(steps=2, guidance=1.5),
                                              references=references, progress=False, device=here)
    decoded = vae.decode(reference_latent, device=here)
    assert dit_seen and set(dit_seen) == {here}
    assert vae_seen and set(vae_seen) == {here}
    assert latents.device == here and torch.isfinite(latents).all()
    assert decoded.shape == (1, H, W, 3)
    assert not device_attributes(dit) and not device_attributes(vae.model)


def test_without_a_device_a_stage_computes_where_the_weights_are(monkeypatch):
    """Scripts and tests call the stages without ``device=``: the weights' device is used, so a model whose
    weights claim to be elsewhere is sent there (here: a device this CPU machine does not have)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: the fallback must fail visibly")
    dit = tiny_dit()
    monkeypatch.setattr(GlmImageDiT, "device", property(lambda self: ELSEWHERE))
    with pytest.raises((AssertionError, RuntimeError)):  # torch: not compiled with CUDA / no driver
        decoder_sampling.sample_latents(dit, prior_ids(), glyph(), H, W, DecoderRun(steps=1), progress=False)
