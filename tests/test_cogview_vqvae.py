"""The CogView v1 VQ-VAE: release layout, nearest codes, round trip, safe loading."""
import pytest
import torch
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models.cogview_vqvae import load_cogview_vqvae
from glm_image_nodes.testing.tiny_cogview_vqvae import write_random_cogview_vqvae
from safetensors.torch import load_file, save_file

RELEASE_SHAPES = {  # cogview_and_tokenizers.md section 1.1
    "module.enc_b.blocks.0.weight": (512, 3, 4, 4), "module.enc_b.blocks.0.bias": (512,),
    "module.enc_b.blocks.2.weight": (512, 512, 4, 4), "module.enc_b.blocks.2.bias": (512,),
    "module.enc_b.blocks.4.weight": (512, 512, 4, 4), "module.enc_b.blocks.4.bias": (512,),
    "module.enc_b.blocks.6.weight": (256, 512, 1, 1), "module.enc_b.blocks.6.bias": (256,),
    "module.quantize_t.embed": (256, 8192), "module.quantize_t.cluster_size": (8192,),
    "module.quantize_t.embed_avg": (256, 8192),
    "module.dec.blocks.0.weight": (256, 512, 4, 4), "module.dec.blocks.0.bias": (512,),
    "module.dec.blocks.2.weight": (512, 512, 4, 4), "module.dec.blocks.2.bias": (512,),
    "module.dec.blocks.4.weight": (512, 512, 4, 4), "module.dec.blocks.4.bias": (512,),
    "module.dec.blocks.6.weight": (3, 512, 1, 1), "module.dec.blocks.6.bias": (3,),
}
SMALL = dict(channel=32, embed_dim=16, n_embed=512)


class NotATensor:
    pass


def test_release_layout_loads_strictly_in_both_forms(tmp_path):
    pt = write_random_cogview_vqvae(str(tmp_path / "vqvae_hard_biggerset_011.pt"), format="pt")
    st = write_random_cogview_vqvae(str(tmp_path / "vqvae.safetensors"), format="safetensors")
    sd = torch.load(pt, weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == RELEASE_SHAPES
    from_safetensors = load_file(st)
    assert all(torch.equal(v, from_safetensors[k]) for k, v in sd.items())
    model = load_cogview_vqvae(pt, device="cpu")
    assert set(model.state_dict()) == {k.removeprefix("module.") for k in RELEASE_SHAPES} - {
        "quantize_t.cluster_size", "quantize_t.embed_avg"}
    assert torch.equal(model.quantize_t.embed, sd["module.quantize_t.embed"])
    images = torch.rand(2, 64, 48, 3)
    ids = model.encode(images)
    assert ids.shape == (2, 8, 6) and ids.dtype == torch.int64
    assert torch.equal(load_cogview_vqvae(st, device="cpu").encode(images), ids)


@pytest.fixture()
def small(tmp_path):
    path = write_random_cogview_vqvae(str(tmp_path / "small.pt"), seed=1, **SMALL)
    model = load_cogview_vqvae(path, device="cpu")
    with torch.no_grad():  # a codebook drawn from the features, so that many codes are in use
        z = model.features(torch.rand(4, 128, 128, 3)).reshape(-1, SMALL["embed_dim"])
        picks = z[torch.randperm(z.shape[0])[:SMALL["n_embed"]]]
        model.quantize_t.embed.copy_((picks + 0.05 * z.std() * torch.randn_like(picks)).t())
    return model


def brute_force_ids(model, images):
    z = model.features(images)
    d = torch.cdist(z.reshape(-1, z.shape[-1]).double(), model.quantize_t.embed.t().double())
    return d.argmin(1).view(z.shape[:-1]), d


def test_shapes_256_and_512(small):
    for size in (256, 512):
        ids = small.encode(torch.rand(1, size, size, 3))
        assert ids.shape == (1, size // 8, size // 8) and ids.dtype == torch.int64
        assert 0 <= ids.min() and ids.max() < SMALL["n_embed"]
        images = small.decode(ids)
        assert images.shape == (1, size, size, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert 0 <= images.min() and images.max() <= 1
    wide = small.encode(torch.rand(2, 128, 256, 3))
    assert wide.shape == (2, 16, 32) and small.decode(wide).shape == (2, 128, 256, 3)


def test_nearest_code_matches_brute_force_and_round_trip(small):
    images = torch.rand(2, 128, 96, 3)
    with torch.no_grad():
        ids = small.encode(images)
        want, d = brute_force_ids(small, images)
    flat = ids.flatten()
    assert flat.unique().numel() > 100
    mismatch = (flat != want.flatten()).float().mean().item()
    gap = (d.gather(1, flat[:, None]) - d.min(1, keepdim=True).values).max().item()
    print(f"ids differing from cdist argmin: {mismatch:.4%}, worst distance gap {gap:.2e}")
    assert mismatch <= 1e-3 and gap <= 1e-4  # only exact near-ties may differ
    assert torch.equal(small.decode(ids), small.decode(want))


def test_input_normalization(small):
    grey = torch.tensor([0.79093, 0.76271, 0.75340]).expand(1, 16, 16, 3)
    with torch.no_grad():  # the dataset mean maps to a zero input: the encoder output is its bias chain
        x = torch.zeros(1, 3, 16, 16)
        assert torch.allclose(small.features(grey), small.enc_b(x).permute(0, 2, 3, 1), atol=1e-6)


def test_bad_inputs(small):
    with pytest.raises(ValueError, match=r"multiples of 8; got 256x250 .*256x248 or 256x256"):
        small.encode(torch.rand(1, 250, 256, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        small.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"0\.\.511"):
        small.decode(torch.full((1, 2, 2), 512))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module.quantize_t.embed": torch.zeros(16, 512), "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refused: besides tensors it holds pickled Python objects"):
        load_cogview_vqvae(str(path), device="cpu")


def test_safetensors_with_and_without_prefix_give_identical_ids(tmp_path):
    pt = write_random_cogview_vqvae(str(tmp_path / "a.pt"), seed=3, **SMALL)
    sd = torch.load(pt, weights_only=True)
    save_file({k.removeprefix("module."): v for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    prefixed = write_random_cogview_vqvae(str(tmp_path / "prefixed.safetensors"), format="safetensors", seed=3, **SMALL)
    images = torch.rand(2, 64, 64, 3)
    ids = load_cogview_vqvae(pt, device="cpu").encode(images)
    for path in (prefixed, str(tmp_path / "plain.safetensors")):
        assert torch.equal(load_cogview_vqvae(path, device="cpu").encode(images), ids)
    (tmp_path / "a.pt").unlink()
    (tmp_path / "plain.safetensors").unlink()
    assert torch.equal(load_cogview_vqvae(str(tmp_path), device="cpu").encode(images), ids)  # a folder with one file
