"""Every API-format example workflow runs in a real, headless ComfyUI on tiny random weights and makes its images.

The releases carry the names the workflows choose (GLM-Image, CogView4-6B, GLM-4.6V-Flash), so each workflow runs
as shipped except for speed: output sizes 512x512, 2 decoder steps, 16 caption tokens; the input folder holds
the images the LoadImage nodes name (256x256: references are normalized to 512, the 2x upscale gives 512).
Each SaveImage must return the images of its batch at the expected size. Needs GLMIMAGE_COMFYUI (see
comfyui_server.py); skipped otherwise. About a minute on 2 CPU cores.
"""
import glob
import json
import os
import uuid

import pytest
from comfyui_server import AVAILABLE, ROOT, SKIP_REASON, comfyui

if not AVAILABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from glm_image_nodes.headless import client  # noqa: E402
from glm_image_nodes.testing.tiny_lora import write_tiny_loras  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_dit import write_tiny_cogview4_release  # noqa: E402
from tiny_glmv import write_tiny_glmv  # noqa: E402

import convert  # noqa: E402

pytestmark = pytest.mark.comfyui

API_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "api", "*.json")))
INPUT_SIDE, OUTPUT_SIDE = 256, 512


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui_workflows")
    models = root / "models"
    release = write_tiny_release(str(models / "glm_image" / "GLM-Image"))
    write_tiny_cogview4_release(str(models / "glm_image" / "CogView4-6B"))
    write_tiny_glmv(str(models / "text_encoders" / "GLM-4.6V-Flash"))
    write_gguf_files(release, models)
    write_tiny_loras(release, str(models / "loras"),  # the names the LoRA workflow chooses
                     ar_name="glm_image_ar_style_lora", dit_name="glm_image_dit_style_lora.safetensors")
    folders = {name: str(models / name) for name in ("glm_image", "text_encoders", "diffusion_models", "loras")}
    with comfyui(str(root), folders) as server:
        names = {node["inputs"]["image"] for path in API_FILES for node in json.load(open(path)).values()
                 if node["class_type"] == "LoadImage"}
        for i, name in enumerate(sorted(names)):
            Image.new("RGB", (INPUT_SIDE, INPUT_SIDE), (40 * i, 200 - 40 * i, 90)).save(root / "input" / name)
        yield server


def write_gguf_files(release: str, models) -> None:
    """The files the GGUF example workflow names: convert.py's q4_k laid out in the models folder."""
    assert convert.main([release, "--format", "q4_k", "--comfyui-models", str(models)]) == 0


def fast(graph: dict) -> dict:
    """The workflow at 512x512 (sizes 0 keep the reference's), 2 steps, 16 caption tokens."""
    for node in graph.values():
        inputs = node["inputs"]
        for side in ("width", "height"):
            if inputs.get(side):
                inputs[side] = OUTPUT_SIDE
        if "steps" in inputs:
            inputs["steps"] = 2
        if "max_new_tokens" in inputs:
            inputs["max_new_tokens"] = 16
    return graph


def expected_batch(graph: dict, node_id: str) -> int:
    """Images a SaveImage receives: num_images of the AR sampler upstream (1 for the best of a rerank)."""
    source_id, slot = graph[node_id]["inputs"]["images"]
    todo, batch = [source_id], 1
    while todo:
        node = graph[todo.pop()]
        if node["class_type"] == "GLMImageRerank" and slot == 0:
            return 1
        batch = max(batch, node["inputs"].get("num_images", 1))
        todo += [v[0] for v in node["inputs"].values() if isinstance(v, list)]
    return batch


def on_ar_service(graph: dict, request) -> dict:
    """Workflows with the AR on a server ask the AR service (real Ray Serve, the tiny release's twin)."""
    servers = [node for node in graph.values() if node["class_type"] == "GLMImageARServerSampler"]
    if servers:
        url, _ = request.getfixturevalue("ar_service")
        for node in servers:
            node["inputs"]["endpoint"] = url
    return graph


@pytest.mark.parametrize("path", API_FILES, ids=os.path.basename)
def test_example_workflow_runs_and_makes_its_images(comfy, path, tmp_path, request):
    with open(path, encoding="utf-8") as f:
        graph = on_ar_service(fast(json.load(f)), request)
    client_id = uuid.uuid4().hex
    events = []
    history = client.follow(comfy.url, client.submit(comfy.url, graph, client_id), client_id, events.append,
                            timeout=600)
    saves = [i for i, node in graph.items() if node["class_type"] == "SaveImage"]
    assert saves and set(saves) <= set(history["outputs"]), (saves, history["outputs"])
    for node_id in saves:
        images = history["outputs"][node_id]["images"]
        assert len(images) == expected_batch(graph, node_id), (node_id, images)
        for path_ in client.save_outputs(comfy.url, {"outputs": {node_id: {"images": images}}}, str(tmp_path)):
            with Image.open(path_) as image:
                assert image.format == "PNG" and image.size == (OUTPUT_SIDE, OUTPUT_SIDE), (path_, image.size)
