"""The pack inside a real, headless ComfyUI: it imports, its nodes are listed, the text-to-image workflow runs
on a tiny random release with live previews on the websocket, the locales are served, and errors reach the
client with the node and the reason.

Enabled by ``GLMIMAGE_COMFYUI=<ComfyUI tree>``, run with ``GLMIMAGE_COMFYUI_PYTHON`` (default ``python3``);
skipped otherwise. One CPU server serves the whole module (see comfyui_server.py).
"""
import io
import json
import os
import uuid

import pytest
from comfyui_server import AVAILABLE, PACK_FOLDER, ROOT, SKIP_REASON, comfyui

if not AVAILABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from glm_image_nodes.headless import client  # noqa: E402
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402
from PIL import Image  # noqa: E402

import convert  # noqa: E402

pytestmark = pytest.mark.comfyui

T2I_WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "glm_image_text_to_image.json")
GGUF_WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "glm_image_gguf_text_to_image.json")
# A test-only node (not part of the pack) that reports ComfyUI's loaded-model accounting after an image is made.
PROBE_PACK = '''
import json
import comfy.model_management as mm

class GLMTestLoadedModels:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def report(self, images):
        models = []
        for loaded in mm.current_loaded_models:
            patcher = loaded.model
            net = getattr(patcher.model, "net", None)
            first = next(net.parameters()) if net is not None else None
            models.append({"name": type(patcher.model).__name__, "pack": net is not None, "patcher": id(patcher),
                           "size": patcher.model_size(), "loaded": patcher.loaded_size(),
                           "device": str(patcher.load_device),
                           "first_weight": first.data_ptr() if first is not None else None})
        return {"ui": {"text": [json.dumps(models)]}}

NODE_CLASS_MAPPINGS = {"GLMTestLoadedModels": GLMTestLoadedModels}
'''


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    releases = root / "models" / "glm_image"
    write_tiny_release(str(releases / "tiny"))
    # Listed by the loaders (it has a model_index.json) but holds no component: fails at execution time.
    (releases / "broken").mkdir()
    (releases / "broken" / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    # The tiny release in GGUF, where ComfyUI users put such files: text models in text_encoders/<name>/ with
    # their tokenizer, the DiT in unet/ (ComfyUI lists it under diffusion_models)
    converted = root / "converted"
    assert convert.main([str(releases / "tiny"), "--format", "q4_k", "--out", str(converted)]) == 0
    text_encoders, unet = root / "models" / "text_encoders", root / "models" / "unet"
    (text_encoders / "tiny").mkdir(parents=True)
    unet.mkdir()
    for name in ("tiny_glm_image_ar_q4_k.gguf", "tiny_glyph_byt5_q4_k.gguf", "tokenizer.json", "tokenizer_config.json"):
        if (converted / name).exists():
            (converted / name).rename(text_encoders / "tiny" / name)
    (converted / "tiny_glm_image_dit_q4_k.gguf").rename(unet / "tiny_glm_image_dit_q4_k.gguf")
    (root / "custom_nodes" / "glm_test_probe").mkdir(parents=True)
    (root / "custom_nodes" / "glm_test_probe" / "__init__.py").write_text(PROBE_PACK)
    folders = {"glm_image": str(releases), "text_encoders": str(text_encoders), "diffusion_models": str(unet)}
    with comfyui(str(root), folders, extra_args=["--preview-method", "auto"]) as server:
        yield server


def _t2i_graph() -> dict:
    """The example workflow at 512x512 with 2 decoder steps, every loader on the tiny release."""
    with open(T2I_WORKFLOW, encoding="utf-8") as f:
        graph = json.load(f)
    for node in graph.values():
        inputs = node["inputs"]
        if "checkpoint" in inputs:
            inputs["checkpoint"] = "tiny"
        if node["class_type"] == "GLMImageARSampler":
            inputs.update(width=512, height=512)
        if node["class_type"] == "GLMImageDecoderSampler":
            inputs["steps"] = 2
    return graph


def _node_id(graph: dict, class_type: str) -> str:
    (node_id,) = [i for i, node in graph.items() if node["class_type"] == class_type]
    return node_id


def test_pack_imports_and_lists_its_nodes(comfy):
    failed = [line for line in comfy.log().splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    assert not failed, f"the pack failed to import:\n{comfy.log()}"
    info = comfy.get_json("/object_info")
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"not in /object_info: {missing}"
    for name in NODE_CLASS_MAPPINGS:
        assert info[name]["category"].startswith("GLM-Image/"), (name, info[name]["category"])
        assert info[name]["python_module"] == f"custom_nodes.{PACK_FOLDER}", (name, info[name]["python_module"])
    checkpoints = info["GLMImageARLoader"]["input"]["required"]["checkpoint"][0]
    assert "tiny" in checkpoints, checkpoints


def test_text_to_image_runs_with_websocket_progress_and_previews(comfy, tmp_path):
    graph = _t2i_graph()
    events, previews = [], []
    saved = client.run(comfy.url, graph, str(tmp_path), events.append,
                       on_preview=lambda node, kind, data: previews.append((node, kind, data)))
    assert len(saved) == 1, saved
    with Image.open(saved[0]) as image:
        assert image.format == "PNG" and image.size == (512, 512), (image.format, image.size)
    # Progress only arrives over the websocket (the polling fallback reports none); both samplers report it.
    progressed = {event.split(":")[0] for event in events if event.startswith("node ") and "/" in event}
    for sampler in ("GLMImageARSampler", "GLMImageDecoderSampler"):
        assert f"node {_node_id(graph, sampler)}" in progressed, (sampler, events)
    # Live previews (--preview-method auto) as binary frames naming their node: one per decoder step, one per
    # row of each grid the AR writes (512x512: a 16x16 preview grid, then the 16x16 token grid).
    by_node = {}
    for node, kind, data in previews:
        assert kind == "image/jpeg", kind
        with Image.open(io.BytesIO(data)) as frame:
            assert frame.format == "JPEG" and frame.size == (512, 512), (frame.format, frame.size)
        by_node[node] = by_node.get(node, 0) + 1
    assert by_node == {_node_id(graph, "GLMImageDecoderSampler"): 2, _node_id(graph, "GLMImageARSampler"): 32}, by_node


def _loaded_models(comfy, graph: dict, seed: int) -> list[dict]:
    """Run ``graph`` with the decoder seed set and the probe after the image; ComfyUI's loaded models then."""
    graph = json.loads(json.dumps(graph))
    graph[_node_id(graph, "GLMImageDecoderSampler")]["inputs"]["seed"] = seed
    graph["probe"] = {"class_type": "GLMTestLoadedModels",
                      "inputs": {"images": [_node_id(graph, "GLMImageVAEDecode"), 0]}}
    client_id = uuid.uuid4().hex
    history = client.follow(comfy.url, client.submit(comfy.url, graph, client_id), client_id, lambda event: None)
    return json.loads(history["outputs"]["probe"]["text"][0])


def test_models_stay_in_comfyui_accounting_and_are_not_reloaded(comfy):
    graph = _t2i_graph()
    first = _loaded_models(comfy, graph, seed=1)
    requested = comfy.log().count("Requested to load")
    second = _loaded_models(comfy, graph, seed=2)  # the samplers run again, the loaders are cached
    pack = {m["name"]: m for m in first if m["pack"]}
    assert {"GlmImageAR", "T5Encoder", "GlmImageDiT", "AutoencoderKL"} <= set(pack), first
    for model in pack.values():
        assert model["size"] > 0 and model["loaded"] == model["size"], model  # fully loaded: it fits
    again = {m["name"]: m for m in second if m["pack"]}
    for name, model in pack.items():  # the same ModelPatcher, the same weight storage: nothing moved or reloaded
        assert (again[name]["patcher"], again[name]["first_weight"]) == (model["patcher"], model["first_weight"])
    assert comfy.log().count("Requested to load") == requested, comfy.log()


def test_gguf_workflow_finds_its_files_and_runs(comfy, tmp_path):
    info = comfy.get_json("/object_info")
    choices = {name: info[name]["input"]["required"]["checkpoint"][0]
               for name in ("GLMImageARLoader", "GLMImageGlyphEncoderLoader", "GLMImageDecoderLoader")}
    assert "tiny/tiny_glm_image_ar_q4_k.gguf" in choices["GLMImageARLoader"], choices
    assert "tiny/tiny_glyph_byt5_q4_k.gguf" in choices["GLMImageGlyphEncoderLoader"], choices
    assert "tiny_glm_image_dit_q4_k.gguf" in choices["GLMImageDecoderLoader"], choices  # models/unet
    with open(GGUF_WORKFLOW, encoding="utf-8") as f:
        graph = json.load(f)
    files = {"GLMImageARLoader": "tiny/tiny_glm_image_ar_q4_k.gguf",
             "GLMImageGlyphEncoderLoader": "tiny/tiny_glyph_byt5_q4_k.gguf",
             "GLMImageDecoderLoader": "tiny_glm_image_dit_q4_k.gguf", "GLMImageVAELoader": "tiny"}
    for node in graph.values():
        if node["class_type"] in files:
            node["inputs"]["checkpoint"] = files[node["class_type"]]
        if node["class_type"] == "GLMImageARSampler":
            node["inputs"].update(width=512, height=512)
        if node["class_type"] == "GLMImageDecoderSampler":
            node["inputs"]["steps"] = 2
    saved = client.run(comfy.url, graph, str(tmp_path), lambda event: None)
    with Image.open(saved[0]) as image:
        assert image.size == (512, 512)


def test_locales_are_served(comfy):
    translations = comfy.get_json("/i18n")
    for lang in ("en", "zh"):
        assert set(NODE_CLASS_MAPPINGS) <= set(translations[lang]["nodeDefs"]), lang
        assert "GLM-Image" in translations[lang]["nodeCategories"], lang
    assert translations["zh"]["nodeDefs"]["GLMImageDecoderSampler"]["display_name"] != \
        translations["en"]["nodeDefs"]["GLMImageDecoderSampler"]["display_name"]


def test_missing_component_surfaces_as_execution_error(comfy, tmp_path):
    graph = {
        "1": {"class_type": "GLMImageVAELoader", "inputs": {"checkpoint": "broken", "dtype": "auto"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "3": {"class_type": "GLMImageVAEDecode", "inputs": {"vae": ["1", 0], "latent": ["2", 0], "tiling": "auto"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "broken"}},
    }
    with pytest.raises(client.WorkflowError) as error:
        client.run(comfy.url, graph, str(tmp_path), lambda event: None)
    message = str(error.value)
    assert message.startswith("node 1 (GLMImageVAELoader) failed: CheckpointError: "), message
    assert "broken is a release folder but has no vae/ component" in message, message


def test_node_exception_names_the_node(comfy, tmp_path):
    # A core 4-channel latent wired into the 16-channel GLM-Image VAE: the decode node raises.
    graph = {
        "1": {"class_type": "GLMImageVAELoader", "inputs": {"checkpoint": "tiny", "dtype": "auto"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "3": {"class_type": "GLMImageVAEDecode", "inputs": {"vae": ["1", 0], "latent": ["2", 0], "tiling": "auto"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "wrong_latent"}},
    }
    with pytest.raises(client.WorkflowError) as error:
        client.run(comfy.url, graph, str(tmp_path), lambda event: None)
    assert str(error.value) == ("node 3 (GLMImageVAEDecode) failed: ValueError: VAE decode expects latents "
                                "[B, 16, h, w]; got shape (1, 4, 32, 32)."), str(error.value)


def test_invalid_combo_value_is_rejected_by_validation(comfy, tmp_path):
    graph = _t2i_graph()
    graph[_node_id(graph, "GLMImageARLoader")]["inputs"]["checkpoint"] = "no-such-release"
    with pytest.raises(client.WorkflowError) as error:
        client.run(comfy.url, graph, str(tmp_path), lambda event: None)
    message = str(error.value)
    assert message.startswith("the server rejected the workflow: "), message  # the 400 path
    assert f"node {_node_id(graph, 'GLMImageARLoader')} (GLMImageARLoader): value_not_in_list" in message, message
    assert "no-such-release" in message, message


@pytest.mark.parametrize("node, change, message", [
    ("GLMImageARSampler", dict(width=1000), "GLM-Image makes images with sides of 512..2048 px in multiples of 32; "
                                            "1000x512 (WxH) is not one. The nearest valid size is 992x512."),
    ("GLMImageARSampler", dict(seed=-1), "seed = -1 is out of range: it must be 0..18446744073709551615. Use a seed"),
    ("GLMImageDecoderSampler", dict(guidance=float("nan")), "guidance must be a finite number, got nan."),
    ("GLMImageGlyphConditioning", dict(prompt="a sign that says \ud83d"), "prompt holds invalid Unicode"),
])
def test_validate_inputs_refuses_before_anything_loads(comfy, tmp_path, node, change, message):
    """ComfyUI calls the nodes' VALIDATE_INPUTS before running anything: a 400 with the core's message, which the
    client prints once per node (ComfyUI repeats it for every input the check takes)."""
    graph = _t2i_graph()
    graph[_node_id(graph, node)]["inputs"].update(change)
    with pytest.raises(client.WorkflowError) as error:
        client.run(comfy.url, graph, str(tmp_path), lambda event: None)
    lines = str(error.value).splitlines()
    assert lines[0].startswith("the server rejected the workflow: "), lines
    expected = f"node {_node_id(graph, node)} ({node}): custom_validation_failed: "
    assert len(lines) == 2 and lines[1].startswith(expected), lines
    assert message in lines[1], lines


def test_system_check_node_reports_inside_comfyui(comfy):
    graph = {"check": {"class_type": "GLMImageSystemCheck", "inputs": {}}}
    client_id = uuid.uuid4().hex
    history = client.follow(comfy.url, client.submit(comfy.url, graph, client_id), client_id, lambda event: None)
    text = history["outputs"]["check"]["text"][0]
    assert text.startswith("GLM-Image system check") and "torch: " in text and "RAM free (GiB)" in text
    assert "No CUDA device" in text  # ComfyUI runs on the CPU here
