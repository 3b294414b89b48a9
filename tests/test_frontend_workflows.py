"""Every UI-format example workflow in the real ComfyUI frontend (the comfyui-frontend-package ComfyUI serves),
in headless Chromium: loaded with ``app.loadGraphData``, exported with ``app.graphToPrompt`` (what "Queue" and
"Export (API)" send), it must equal its API-format twin input for input, so every widget value lands in its own
widget; and no node may overlap another at the size the frontend gives it (``max(size, computeSize())``, title
bar included).

Needs GLMIMAGE_COMFYUI (see comfyui_server.py), a ComfyUI Python with the frontend package, and Chromium
(``chromium`` on PATH or GLMIMAGE_CHROMIUM); skipped otherwise. About 40 s.
"""
import glob
import json
import os
import subprocess

import pytest
from comfyui_server import AVAILABLE, PYTHON, ROOT, SKIP_REASON, comfyui
from headless_browser import CHROMIUM, browser_page

if not AVAILABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)
if CHROMIUM is None:
    pytest.skip("no Chromium (install Debian's chromium or set GLMIMAGE_CHROMIUM)", allow_module_level=True)
if subprocess.run([PYTHON, "-c", "import comfyui_frontend_package"], capture_output=True).returncode:
    pytest.skip("the ComfyUI Python has no comfyui-frontend-package", allow_module_level=True)

pytestmark = pytest.mark.comfyui

UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
READY = ("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app && window.comfyAPI.app.app.graph "
         "&& window.LiteGraph && LiteGraph.registered_node_types['GLMImageARSampler'])")
LOAD_AND_READ = """(async () => {
  const app = window.comfyAPI.app.app;
  await app.loadGraphData(%s, true, false);
  const prompt = await app.graphToPrompt();
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = app.graph._nodes.map(n => {
    const min = n.computeSize();
    const w = Math.max(n.size[0], min[0]), h = Math.max(n.size[1], min[1]);
    return {id: n.id, type: n.type, box: [n.pos[0], n.pos[1] - title, w, h + title],
            widgets: (n.widgets || []).map(x => [x.name, x.value])};
  });
  return JSON.stringify({prompt: prompt.output, nodes});
})()"""


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    """ComfyUI with the frontend and the model names the workflows choose (empty folders suffice to list them)."""
    root = tmp_path_factory.mktemp("comfyui_frontend")
    models = root / "models"
    for release in ("GLM-Image", "CogView4-6B"):
        (models / "glm_image" / release).mkdir(parents=True)
        (models / "glm_image" / release / "model_index.json").write_text("{}")
    (models / "text_encoders" / "GLM-4.6V-Flash").mkdir(parents=True)
    (models / "text_encoders" / "GLM-4.6V-Flash" / "config.json").write_text("{}")
    with comfyui(str(root), {"glm_image": str(models / "glm_image"), "text_encoders": str(models / "text_encoders")},
                 frontend=True) as server:
        with browser_page(str(root / "chromium")) as page:
            page.call("Page.navigate", url=server.url + "/")
            page.wait_for(READY, timeout=120)
            yield page


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_the_frontend_reads_the_api_twin_and_nothing_overlaps(frontend, path):
    with open(path, encoding="utf-8") as f:
        workflow = f.read()
    with open(os.path.join(ROOT, "example_workflows", "api", os.path.basename(path)), encoding="utf-8") as f:
        api = json.load(f)
    state = json.loads(frontend.evaluate(LOAD_AND_READ % workflow))
    exported = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
                for node_id, node in state["prompt"].items()}
    assert exported == {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
                        for node_id, node in api.items()}
    boxes = {node["id"]: node["box"] for node in state["nodes"]}
    for a, box_a in boxes.items():
        for b, box_b in boxes.items():
            if a < b:
                overlap = (box_a[0] < box_b[0] + box_b[2] and box_b[0] < box_a[0] + box_a[2]
                           and box_a[1] < box_b[1] + box_b[3] and box_b[1] < box_a[1] + box_a[3])
                assert not overlap, f"nodes {a} {box_a} and {b} {box_b} overlap"
    # the stored sizes are the frontend's: nothing was enlarged on load
    stored = {n["id"]: n["size"] for n in json.loads(workflow)["nodes"]}
    for node in state["nodes"]:
        assert node["box"][2:] == [stored[node["id"]][0], stored[node["id"]][1] + 30], node


def test_a_workflow_from_before_the_prompt_output_still_loads(frontend):
    """Saved before the AR sampler had its prompt output: Glyph Conditioning types the prompt itself and the
    sampler has one output. The frontend loads it and exports it unchanged (the prompt widget still works)."""
    from glm_image_nodes.headless.workflow_format import api_to_ui
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS

    with open(os.path.join(ROOT, "example_workflows", "api", "glm_image_text_to_image.json"), encoding="utf-8") as f:
        api = json.load(f)
    api["6"]["inputs"]["prompt"] = api["5"]["inputs"]["prompt"]
    old = api_to_ui(api, NODE_CLASS_MAPPINGS)
    (sampler,) = [n for n in old["nodes"] if n["type"] == "GLMImageARSampler"]
    assert sampler["outputs"][1]["links"] == []
    del sampler["outputs"][1]
    state = json.loads(frontend.evaluate(LOAD_AND_READ % json.dumps(old)))
    assert {k: v["inputs"] for k, v in state["prompt"].items()} == {k: v["inputs"] for k, v in api.items()}
