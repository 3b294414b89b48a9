"""Node-level tests: the CogView4 workflow in-process, GLM-V caption/rerank nodes, CogView VQ-VAE nodes."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glm_image_nodes.headless.executor import Executor  # noqa: E402
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES  # noqa: E402
from glm_image_nodes.testing.tiny_cogview_vqvae import write_random_cogview_vqvae  # noqa: E402
from tiny_dit import write_tiny_cogview4_release  # noqa: E402
from tiny_glmv import IMAGE_SIZE, write_tiny_glmv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cogview4_release(tmp_path_factory):
    return write_tiny_cogview4_release(str(tmp_path_factory.mktemp("cogview4")))


def test_cogview4_workflow_runs_in_process(cogview4_release, tmp_path):
    with open(os.path.join(ROOT, "example_workflows", "api", "cogview4_text_to_image.json")) as f:
        graph = json.load(f)
    for node in graph.values():
        inputs = node["inputs"]
        if "checkpoint" in inputs:
            inputs.update(checkpoint=cogview4_release, dtype="fp32")
        if node["class_type"] == "GLMImageCogView4Sampler":
            inputs.update(width=512, height=512, steps=2)
    ran = []
    saved = Executor(NODES, str(tmp_path), on_node=lambda i, c, s: ran.append(c)).run(graph)
    assert len(saved) == 1 and Image.open(saved[0]).size == (512, 512)
    assert "GLMImageCogView4TextEncode" in ran and "GLMImageCogView4Sampler" in ran


@pytest.mark.parametrize("width,height,message", [
    (500, 512, "multiples of 32"), (256, 512, "512..2048"), (2048, 2048, "2^21"), (4096, 512, "512..2048")])
def test_cogview4_sampler_rejects_bad_sizes_before_running(width, height, message):
    sampler = NODES["GLMImageCogView4Sampler"]()
    with pytest.raises(ValueError, match=message.replace("^", r"\^").replace(".", r"\.")) as error:
        sampler.sample(decoder=None, conditioning=None, width=width, height=height, seed=0, steps=1, guidance=5.0,
                       num_images=1)
    assert "1024x1024" in str(error.value)  # names valid sizes


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    folder = write_tiny_glmv(str(tmp_path_factory.mktemp("glmv")))
    return NODES["GLMImageCaptionerLoader"]().load(folder, "fp32")[0]


def images(n):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, IMAGE_SIZE, IMAGE_SIZE, 3, generator=g)


def test_caption_node_appends_the_instruction(captioner):
    (text,) = NODES["GLMImageCaption"]().caption(captioner, images(1), "short caption", max_new_tokens=8,
                                                 temperature=0.0, seed=0, append="Make it winter.")
    assert isinstance(text, str) and text.endswith("Make it winter.")


def test_rerank_node_orders_by_score(captioner):
    batch = images(3)
    best, ranked, report = NODES["GLMImageRerank"]().rerank(captioner, batch, "a photo of a cat")
    lines = report.splitlines()
    order = [int(line.split("image ")[1].split()[0]) for line in lines]
    scores = [float(line.rsplit("score ", 1)[1]) for line in lines]
    assert sorted(order) == [0, 1, 2] and scores == sorted(scores, reverse=True)
    assert torch.equal(best[0], batch[order[0]]) and torch.equal(ranked, batch[order])
    single, ranked_single, report_single = NODES["GLMImageRerank"]().rerank(captioner, batch[:1], "a photo of a cat")
    assert torch.equal(single, batch[:1]) and report_single.startswith("#1: image 0 score")


def test_cogview_vq_nodes_round_trip_shapes(tmp_path):
    path = write_random_cogview_vqvae(str(tmp_path / "vq.pt"), channel=16, embed_dim=8, n_embed=64)
    (vqvae,) = NODES["GLMImageCogViewVQVAELoader"]().load(path)
    image = torch.rand(2, 64, 48, 3)
    (tokens,) = NODES["GLMImageCogViewVQEncode"]().encode(vqvae, image)
    assert tokens.shape == (2, 8, 6) and tokens.dtype == torch.int64 and int(tokens.max()) < 64
    (decoded,) = NODES["GLMImageCogViewVQDecode"]().decode(vqvae, tokens)
    assert decoded.shape == (2, 64, 48, 3) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
