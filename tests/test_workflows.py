"""Every example workflow (UI and API format) matches the pack's node definitions."""
import glob
import json
import os

import pytest
from glm_image_nodes.headless.workflow_format import (
    TITLE_HEIGHT,
    all_inputs,
    api_to_ui,
    has_control_widget,
    input_types,
    is_widget,
    output_types,
    ui_to_api,
)
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# UI format beside each other (ComfyUI's template browser lists them); the API-format twins in api/.
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
API_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "api", "*.json")))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def strip_meta(graph):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


def check_widget(where, name, spec, value):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        if options.get("glm_model_file") or options.get("image_upload"):
            assert isinstance(value, str) and value, f"{where}: {name} must name a file"
        else:
            assert value in kind, f"{where}: {name}={value!r} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name} must be an int"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {name}={value} out of range"
        if "step" in options and name in ("width", "height"):
            assert value % options["step"] == 0, f"{where}: {name}={value} not a multiple of {options['step']}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)), f"{where}: {name} must be a number"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {name}={value} out of range"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name} must be a string"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name} must be a boolean"


def test_there_are_example_workflows():
    assert API_FILES and UI_FILES
    assert {os.path.basename(f) for f in API_FILES} == {os.path.basename(f) for f in UI_FILES}


def check_graph(label, graph):
    for node_id, node in graph.items():
        where = f"{label} node {node_id} ({node['class_type']})"
        types = input_types(NODE_CLASS_MAPPINGS, node["class_type"])
        defined = all_inputs(types)
        unknown = set(node["inputs"]) - set(defined)
        assert not unknown, f"{where}: unknown inputs {unknown}"
        missing = set(types.get("required", {})) - set(node["inputs"])
        assert not missing, f"{where}: missing required inputs {missing}"
        for name, value in node["inputs"].items():
            spec = defined[name]
            if isinstance(value, list):
                src_id, slot = value
                assert src_id in graph, f"{where}: {name} links to missing node {src_id}"
                produced = output_types(NODE_CLASS_MAPPINGS, graph[src_id]["class_type"])[slot]
                assert produced == spec[0], f"{where}: {name} expects {spec[0]} but node {src_id} gives {produced}"
            else:
                assert is_widget(spec), f"{where}: {name} is a {spec[0]} socket and must be linked"
                check_widget(where, name, spec, value)


@pytest.mark.parametrize("path", API_FILES, ids=os.path.basename)
def test_api_workflow_matches_node_definitions(path):
    check_graph(os.path.basename(path), load(path))


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_ui_workflow_is_the_api_twin(path):
    ui = load(path)
    api = load(os.path.join(os.path.dirname(path), "api", os.path.basename(path)))
    converted = ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert strip_meta(converted) == strip_meta(api)
    # regenerated through the converter (python headless/workflow_format.py)
    assert ui == api_to_ui(api, NODE_CLASS_MAPPINGS, name=os.path.basename(path)[:-5].replace("_", " "))
    # no two nodes overlap (title bar included; the sizes are the frontend's, see test_frontend_workflows.py)
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT) for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]), (a, b)
    for link in ui["links"]:
        link_id, src, src_slot, dst, dst_slot, kind = link
        source = next(n for n in ui["nodes"] if n["id"] == src)
        target = next(n for n in ui["nodes"] if n["id"] == dst)
        assert source["outputs"][src_slot]["type"] == kind and link_id in source["outputs"][src_slot]["links"]
        assert target["inputs"][dst_slot]["link"] == link_id and target["inputs"][dst_slot]["type"] == kind


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["5"]["inputs"].update(width=1000), "not a multiple of 32"),
    (lambda g: g["5"]["inputs"].update(top_p=1.5), "out of range"),
    (lambda g: g["8"]["inputs"].update(tiling="sometimes"), "is not one of"),
    (lambda g: g["7"]["inputs"].update(tokens=["6", 0]), "expects GLMIMAGE_TOKENS"),
    (lambda g: g["6"]["inputs"].update(font="serif"), "unknown inputs"),
    (lambda g: g["7"]["inputs"].pop("seed"), "missing required inputs"),
])
def test_validation_catches_broken_workflows(mutate, message):
    graph = load(os.path.join(ROOT, "example_workflows", "api", "glm_image_text_to_image.json"))
    mutate(graph)
    with pytest.raises(AssertionError, match=message):
        check_graph("broken", graph)


def test_control_widgets_follow_the_frontend_rule():
    """The frontend adds a control widget after an INT whose control_after_generate is true, or, when the option
    is absent, that is named seed or noise_seed; an explicit false turns it off. Widgets of other types never."""
    assert has_control_widget("seed", ("INT", {"min": 0}))
    assert has_control_widget("noise_seed", ("INT", {}))
    assert has_control_widget("variation", ("INT", {"control_after_generate": True}))
    assert not has_control_widget("seed", ("INT", {"control_after_generate": False}))
    assert not has_control_widget("steps", ("INT", {"min": 1}))
    assert not has_control_widget("seed", ("STRING", {}))
    # GLMImageCaption's seed has no flag: its control value sits between seed and custom_instruction
    api = load(os.path.join(ROOT, "example_workflows", "api", "glm_image_caption_then_edit.json"))
    ui = api_to_ui(api, NODE_CLASS_MAPPINGS)
    (caption,) = [n for n in ui["nodes"] if n["type"] == "GLMImageCaption"]
    assert caption["widgets_values"] == ["GLM-Image prompt", 1024, 0.0, 0, "fixed", "",
                                         "Make it a snowy winter evening."]
    assert strip_meta(ui_to_api(ui, NODE_CLASS_MAPPINGS)) == strip_meta(api)
    caption["widgets_values"].remove("fixed")  # what the old converter wrote: one value short
    with pytest.raises(ValueError, match=r"node 21 \(GLMImageCaption\): no widget value for 'append'"):
        ui_to_api(ui, NODE_CLASS_MAPPINGS)


def test_readme_lists_every_node_with_its_inputs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        rows = {line.split("|")[1].strip().strip("`"): line for line in f if line.startswith("| `GLMImage")}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id in rows, f"README's node reference lacks {node_id}"
        for name in all_inputs(cls.INPUT_TYPES()):
            assert f"`{name}`" in rows[node_id], f"README's row for {node_id} lacks the input {name}"


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_ui_workflow_is_named_after_its_file(path):
    """The template browser shows ``extra.info.name``: the file's name in words, not some input's name."""
    expected = os.path.basename(path)[:-len(".json")].replace("_", " ")
    assert load(path)["extra"]["info"]["name"] == expected


PROMPT_TAKERS = ("GLMImageGlyphConditioning", "GLMImageRerank")  # nodes that read the AR sampler's prompt


@pytest.mark.parametrize("path", API_FILES, ids=os.path.basename)
def test_the_prompt_is_typed_once(path):
    """Glyph Conditioning (and Rerank) take the prompt from the node that holds it, never a second widget copy."""
    graph = load(path)
    typed = [(node_id, node["inputs"]["prompt"]) for node_id, node in graph.items()
             if isinstance(node["inputs"].get("prompt"), str) and node["inputs"]["prompt"]]
    assert len(typed) <= 1, f"{os.path.basename(path)}: the prompt is typed on several nodes {typed}"
    for node_id, node in graph.items():
        if node["class_type"] in PROMPT_TAKERS and node["inputs"]["prompt"] != "":
            assert isinstance(node["inputs"]["prompt"], list), f"node {node_id} ({node['class_type']}) types it again"
            source_id, slot = node["inputs"]["prompt"]
            source = NODE_CLASS_MAPPINGS[graph[source_id]["class_type"]]
            assert source.RETURN_TYPES[slot] == "STRING", (node_id, source_id, slot)
