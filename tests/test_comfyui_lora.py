"""LoRA inside a real, headless ComfyUI: the LoRA workflow patches a clone of the base model's ModelPatcher; the
next run of the base graph (its samplers run again, not from cache) gives the base image bit for bit, on plain
and on GGUF weights; and ComfyUI's patches give the image the pack's own patches give outside ComfyUI.

Needs GLMIMAGE_COMFYUI (see comfyui_server.py); skipped otherwise. About three minutes on 2 CPU cores.
"""
import json
import os

import numpy as np
import pytest
from comfyui_server import AVAILABLE, ROOT, SKIP_REASON, comfyui

if not AVAILABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from glm_image_nodes.core.convert import conversion  # noqa: E402
from glm_image_nodes.core.models import glm_image_dit  # noqa: E402
from glm_image_nodes.headless import client  # noqa: E402
from glm_image_nodes.headless.executor import Executor  # noqa: E402
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from glm_image_nodes.testing.tiny_lora import write_tiny_loras  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.comfyui

WORKFLOWS = os.path.join(ROOT, "example_workflows", "api")
GGUF_DECODER = "tiny_dit_q8_0.gguf"
PIXEL_TOL = 2  # of 255: ComfyUI merges the delta in its own order of operations (measured 1)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui_lora")
    models = root / "models"
    write_tiny_release(str(models / "glm_image" / "tiny"))
    write_tiny_loras(str(models / "glm_image" / "tiny"), str(models / "loras"))
    (models / "diffusion_models").mkdir()
    conversion.convert_component(glm_image_dit.SPEC, str(models / "glm_image" / "tiny"), "q8_0",
                                 str(models / "diffusion_models" / GGUF_DECODER))
    folders = {name: str(models / name) for name in ("glm_image", "loras", "diffusion_models")}
    with comfyui(str(root), folders) as server:
        server.models = models
        yield server


def graph_of(workflow: str, decoder: str, seed: int) -> dict:
    """An example workflow at 512x512, 2 decoder steps, on the tiny release, its LoRAs and ``decoder``."""
    with open(os.path.join(WORKFLOWS, workflow), encoding="utf-8") as f:
        graph = json.load(f)
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if "checkpoint" in inputs:
            inputs["checkpoint"] = decoder if kind == "GLMImageDecoderLoader" else "tiny"
        if kind == "GLMImageARSampler":
            inputs.update(width=512, height=512, seed=seed)
        if kind == "GLMImageDecoderSampler":
            inputs["steps"] = 2
        if kind == "GLMImageARLoraLoader":
            inputs["lora_name"] = "tiny_ar_lora/adapter_model.safetensors"
        if kind == "GLMImageDecoderLoraLoader":
            inputs["lora_name"] = "tiny_dit_lora.safetensors"
    return graph


def bypassed(graph: dict) -> dict:
    """``graph`` with its LoRA nodes bypassed: their consumers take the model the LoRA node was given."""
    graph = json.loads(json.dumps(graph))
    for lora_id in [i for i, node in graph.items() if node["class_type"].endswith("LoraLoader")]:
        source = next(v for v in graph.pop(lora_id)["inputs"].values() if isinstance(v, list))
        for node in graph.values():
            for name, value in node["inputs"].items():
                if value == [lora_id, 0]:
                    node["inputs"][name] = source
    return graph


def node_id(graph: dict, class_type: str) -> str:
    (found,) = [i for i, node in graph.items() if node["class_type"] == class_type]
    return found


def run(comfy, graph: dict, out_dir: str) -> tuple[np.ndarray, set[str]]:
    """The saved image and the nodes that reported progress (they ran; cached nodes report none)."""
    events = []
    (saved,) = client.run(comfy.url, graph, out_dir, events.append)
    with Image.open(saved) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return pixels, {e.split(":")[0].removeprefix("node ") for e in events if e.startswith("node ")}


def run_outside_comfyui(comfy, graph: dict, out_dir: str) -> np.ndarray:
    for node in graph.values():
        inputs = node["inputs"]
        if "checkpoint" in inputs:
            folder = "glm_image" if inputs["checkpoint"] == "tiny" else "diffusion_models"
            inputs["checkpoint"] = str(comfy.models / folder / inputs["checkpoint"])
        if "lora_name" in inputs:
            inputs["lora_name"] = str(comfy.models / "loras" / inputs["lora_name"])
    (saved,) = Executor(NODE_CLASS_MAPPINGS, out_dir).run(graph)
    with Image.open(saved) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("decoder, seed", [("tiny", 11), (GGUF_DECODER, 12)])
def test_lora_then_the_base_model_bit_identical(comfy, tmp_path, decoder, seed):
    lora_graph = graph_of("glm_image_lora.json", decoder, seed)
    base_graph = bypassed(lora_graph)
    base, _ = run(comfy, base_graph, str(tmp_path / "base"))
    with_lora, ran = run(comfy, lora_graph, str(tmp_path / "lora"))
    assert node_id(lora_graph, "GLMImageDecoderSampler") in ran and np.abs(with_lora - base).max() > 10
    again, ran = run(comfy, base_graph, str(tmp_path / "again"))
    assert {node_id(base_graph, "GLMImageARSampler"), node_id(base_graph, "GLMImageDecoderSampler")} <= ran
    assert np.array_equal(again, base)
    outside = run_outside_comfyui(comfy, lora_graph, str(tmp_path / "outside"))
    difference = int(np.abs(outside - with_lora).max())
    print(f"LoRA image in ComfyUI vs outside it ({decoder}): max difference {difference}/255")
    assert difference <= PIXEL_TOL
