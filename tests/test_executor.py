"""The in-process executor: a malformed workflow is refused with one line naming the node and the fix before any
node runs; SaveImage writes only inside the output folder and LoadImage reads only inside the input folder; an
interrupt requested while idle does not abort the next run."""
import copy
import json
import os

import pytest
from glm_image_nodes.core.host import interrupts
from glm_image_nodes.headless.executor import Executor, NodeFailed, WorkflowError
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.testing.tiny_release import write_tiny_release
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "example_workflows", "api", "glm_image_text_to_image.json")


def t2i() -> dict:
    with open(T2I, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("tiny") / "GLM-Image"))


@pytest.fixture()
def folders(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "in" / "red.png")
    return str(tmp_path / "out"), str(tmp_path / "in")


def round_trip(release, prefix="trip", image="red.png", tiling="on") -> dict:
    """LoadImage -> VAE encode -> VAE decode (tiled: it reports progress, so it sees interrupts) -> SaveImage."""
    return {"1": {"class_type": "GLMImageVAELoader", "inputs": {"checkpoint": release, "dtype": "fp32"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "GLMImageVAEEncode", "inputs": {"vae": ["1", 0], "image": ["2", 0]}},
            "4": {"class_type": "GLMImageVAEDecode", "inputs": {"vae": ["1", 0], "latent": ["3", 0], "tiling": tiling}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}}}


def edit(graph, node, **inputs):
    graph = copy.deepcopy(graph)
    graph[node]["inputs"].update(inputs)
    return graph


MALFORMED = [
    (["not", "a", "dict"], "must be a JSON object of node id -> {class_type, inputs} (ComfyUI's API format), got list: "
                           "export it with Workflow > Export (API)"),
    ({"nodes": [], "links": []}, "This is a UI-format workflow (it has 'nodes' and 'links'): export it in API format"),
    ({**t2i(), "3": {"inputs": {}}}, "node 3 has no class_type: each node must be"),
    ({**t2i(), "3": {"class_type": "KSampler", "inputs": {}}}, "node 3 (KSampler): unknown node type: not a GLM-Image "
                                                               "node nor one of the core nodes"),
    (edit(t2i(), "7", tokens=["99", 0]), "node 7 (GLMImageDecoderSampler): input 'tokens' links to node 99, which is "
                                         "not in the workflow: link it to an existing node"),
    (edit(t2i(), "7", tokens=["5", 3]), "input 'tokens' links to output 3 of node 5 (GLMImageARSampler), which has 2 "
                                        "output(s)"),
    (edit(t2i(), "7", tokens=["6", 0]), "input 'tokens' takes GLMIMAGE_TOKENS but output 0 of node 6 "
                                        "(GLMImageGlyphConditioning) gives GLMIMAGE_GLYPH: link a GLMIMAGE_TOKENS "
                                        "output"),
    (edit(t2i(), "7", decoder="GLM-Image"),
     "input 'decoder' is a GLMIMAGE_DECODER socket: link it to a node's output"),
    (edit(t2i(), "7", steps="fifty"), "node 7 (GLMImageDecoderSampler): steps must be a whole number, got 'fifty' "
                                      "(str). Use 1..200 steps"),
    (edit(t2i(), "7", guidance=True), "guidance must be a number, got True (bool)"),
    (edit(t2i(), "8", tiling="sometimes"), "node 8 (GLMImageVAEDecode): tiling = 'sometimes' is not one of"),
    (edit(t2i(), "5", width=1000), "node 5 (GLMImageARSampler): GLM-Image makes images with sides of 512..2048 px"),
    (edit(t2i(), "5", seed=-1), "node 5 (GLMImageARSampler): seed = -1 is out of range: it must be "
                                "0..18446744073709551615. Use a seed in"),
    (edit(t2i(), "5", font="serif"), "node 5 (GLMImageARSampler): unknown input 'font'; its inputs are ar_model, "
                                     "prompt,"),
    (edit(t2i(), "6", inputs=None), "node 6 (GLMImageGlyphConditioning): unknown input 'inputs'"),
    (edit(t2i(), "1", dtype=["2", 0]), "input 'dtype' takes COMBO but output 0 of node 2"),
    (edit(edit(t2i(), "5", prompt=["7", 0]), "7", seed=["5", 0]), "input 'prompt' takes STRING but output 0 of node 7"),
    (edit(edit(t2i(), "8", latent=["9", 0]), "9", images=["8", 0]), "input 'latent' links to output 0 of node 9 "
                                                                     "(SaveImage), which has 0 output(s)"),
    ({k: v for k, v in t2i().items() if k != "9"}, "The workflow has no output node: add a SaveImage or PreviewImage"),
    (edit(t2i(), "9", filename_prefix="../../escaped"), "node 9 (SaveImage): filename_prefix '../../escaped' would "
                                                        "write outside the output folder"),
    (edit(t2i(), "9", filename_prefix="/tmp/escaped"), "would write outside the output folder"),
]


def _required_missing():
    graph = t2i()
    del graph["7"]["inputs"]["seed"]
    return graph


def _cycle():
    """Two decode/encode nodes feeding each other."""
    return {"1": {"class_type": "GLMImageVAELoader", "inputs": {"checkpoint": "x", "dtype": "fp32"}},
            "2": {"class_type": "GLMImageVAEEncode", "inputs": {"vae": ["1", 0], "image": ["3", 0]}},
            "3": {"class_type": "GLMImageVAEDecode", "inputs": {"vae": ["1", 0], "latent": ["2", 0], "tiling": "auto"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}}


MALFORMED += [(_required_missing(), "node 7 (GLMImageDecoderSampler): required input 'seed' is missing: add it (its "
                                    "default is 0)"),
              (_cycle(), "The workflow has a cycle: node 2 -> node 3 -> node 2: remove one of these links")]


@pytest.mark.parametrize("graph, message", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_workflows_get_one_line_before_anything_runs(graph, message, folders):
    ran = []
    with pytest.raises(WorkflowError) as error:
        Executor(NODES, folders[0], on_node=lambda *a: ran.append(a), input_dir=folders[1]).run(graph)
    text = str(error.value)
    assert message in text and "\n" not in text, text
    assert not ran and not os.path.exists(folders[0])


def test_load_image_reads_only_inside_its_input_folder(release, folders, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    executor = Executor(NODES, folders[0], input_dir=folders[1])
    for name, message in (("../secret.png", "is outside the input folder"), (str(outside), "is outside the input"),
                          ("missing.png", "is not in the input folder")):
        with pytest.raises(WorkflowError, match=f"node 2 \\(LoadImage\\): image '{name}' {message}"):
            executor.run(round_trip(release, image=name))


def test_round_trip_saves_inside_the_output_folder(release, folders):
    out, _ = folders
    saved = Executor(NODES, out, input_dir=folders[1]).run(round_trip(release, prefix="sub/trip"))
    assert saved == [os.path.join(os.path.realpath(out), "sub", "trip_00000.png")]
    with Image.open(saved[0]) as image:
        assert image.size == (64, 48)
    # numbered after the highest image there, like ComfyUI's SaveImage: the next run never overwrites it
    again = Executor(NODES, out, input_dir=folders[1]).run(round_trip(release, prefix="sub/trip"))
    assert again == [os.path.join(os.path.realpath(out), "sub", "trip_00001.png")]
    assert sorted(os.listdir(os.path.join(out, "sub"))) == ["trip_00000.png", "trip_00001.png"]


def test_an_output_node_that_returns_ui_and_result_feeds_its_outputs_on(folders):
    """The System Check node returns ComfyUI's {"ui": ..., "result": (report,)}: a node linked to its report gets
    the text (a ``result`` tuple indexed by the link), not a KeyError."""
    got = []

    class TextSink:
        FUNCTION, RETURN_TYPES, OUTPUT_NODE = "take", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {})}}

        def take(self, text):
            got.append(text)
            return ()

    graph = {"1": {"class_type": "GLMImageSystemCheck", "inputs": {}},
             "2": {"class_type": "TextSink", "inputs": {"text": ["1", 0]}}}
    Executor({**NODES, "TextSink": TextSink}, folders[0], input_dir=folders[1]).run(graph)
    assert len(got) == 1 and isinstance(got[0], str) and "torch" in got[0]


def test_an_empty_or_folder_prefix_saves_inside_the_output_folder(release, folders):
    out, _ = folders
    real = os.path.realpath(out)
    assert Executor(NODES, out, input_dir=folders[1]).run(round_trip(release, prefix="")) == [
        os.path.join(real, "_00000.png")]
    assert Executor(NODES, out, input_dir=folders[1]).run(round_trip(release, prefix="sub/")) == [
        os.path.join(real, "sub", "_00000.png")]


def test_an_interrupt_requested_while_idle_does_not_abort_the_next_run(release, folders):
    executor = Executor(NODES, folders[0], input_dir=folders[1])
    interrupts.request_interrupt()
    assert len(executor.run(round_trip(release))) == 1
    # while running it does stop the run, with the node named
    decode = NODES["GLMImageVAEDecode"].decode

    def interrupted(self, vae, latent, tiling):
        interrupts.request_interrupt()
        return decode(self, vae, latent, tiling)

    NODES["GLMImageVAEDecode"].decode = interrupted
    try:
        with pytest.raises(NodeFailed, match=r"node 4 \(GLMImageVAEDecode\) failed: Interrupted: interrupted by the "
                                             r"user") as error:
            executor.run(round_trip(release))
    finally:
        NODES["GLMImageVAEDecode"].decode = decode
    assert isinstance(error.value.error, interrupts.Interrupted)
    assert len(executor.run(round_trip(release))) == 1


def test_the_glyph_gets_the_prompt_typed_on_the_ar_sampler_and_older_workflows_still_run(release, folders):
    """Glyph Conditioning reads the AR sampler's prompt output; the same graph with the prompt typed on Glyph
    Conditioning as well (a workflow from before) makes the same image. One run: both branches share the AR."""
    graph = t2i()
    for node in graph.values():
        if "checkpoint" in node["inputs"]:
            node["inputs"].update(checkpoint=release, dtype="fp32")
    graph["5"]["inputs"].update(width=512, height=512)
    graph["7"]["inputs"].update(steps=2)
    assert graph["6"]["inputs"]["prompt"] == ["5", 1]
    typed = copy.deepcopy({"16": graph["6"], "17": graph["7"], "18": graph["8"], "19": graph["9"]})
    typed["16"]["inputs"]["prompt"] = graph["5"]["inputs"]["prompt"]
    typed["17"]["inputs"]["glyph"] = ["16", 0]
    typed["18"]["inputs"]["latent"] = ["17", 0]
    typed["19"]["inputs"].update(images=["18", 0], filename_prefix="typed_twice")
    graph["9"]["inputs"]["filename_prefix"] = "linked"
    linked_path, typed_path = Executor(NODES, folders[0], input_dir=folders[1]).run({**graph, **typed})
    with Image.open(linked_path) as linked, Image.open(typed_path) as typed_twice:
        assert "linked" in linked_path and "typed_twice" in typed_path
        assert linked.tobytes() == typed_twice.tobytes()


def test_node_errors_name_the_node(release, folders):
    graph = round_trip(release)
    graph["1"]["inputs"]["checkpoint"] = os.path.join(folders[1], "no-such-release")
    with pytest.raises(NodeFailed, match=r"node 1 \(GLMImageVAELoader\) failed: FileNotFoundError: .*no-such-release "
                                         r"does not exist"):
        Executor(NODES, folders[0], input_dir=folders[1]).run(graph)


def test_demo_refuses_invalid_arguments(capsys, monkeypatch, tmp_path):
    import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a_file = tmp_path.parent / f"{tmp_path.name}_a_file"
    a_file.write_text("")
    for argv, message in ((["--width", "0"], "0x512 (WxH) is not one. The nearest valid size is 512x512"),
                          (["--out", str(a_file)], f"--out {a_file} is a file: give a folder"),
                          (["--previews", str(a_file)], f"--previews {a_file} is a file: give a folder"),
                          (["--width", "1000"], "The nearest valid size is 992x512"),
                          (["--steps", "0"], "--steps = 0 is out of range: it must be 1..200"),
                          (["--seed", "-1"], "--seed = -1 is out of range"),
                          (["--prompt", "\ud800"], "--prompt holds invalid Unicode"),
                          (["--weights", str(tmp_path)], "is not a GLM-Image release folder (no model_index.json)")):
        with pytest.raises(SystemExit) as exit_:
            demo.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not os.listdir(tmp_path)  # refused before writing anything
    assert demo.cache_folder() == os.path.join(str(tmp_path), "glm_image_nodes", "tiny_release")
