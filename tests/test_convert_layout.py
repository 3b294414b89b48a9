"""convert.py --comfyui-models: every component of the tiny release lands in the folder its loader lists, under the
name the example workflows choose, and the GGUF example workflow runs (in-process) on exactly those files."""
import json
import os

import pytest
from glm_image_nodes.core.convert.comfyui_layout import component_format
from glm_image_nodes.headless.executor import Executor
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.testing.tiny_release import write_tiny_release
from PIL import Image

import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "glm_image_gguf_text_to_image.json")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    models = tmp_path_factory.mktemp("comfyui") / "models"
    return models, write_tiny_release(str(models / "glm_image" / "GLM-Image"))


def test_q4_k_goes_where_the_gguf_template_looks_and_the_template_runs_on_it(release, capsys, tmp_path):
    models, root = release
    assert convert.main([root, "--format", "q4_k", "--comfyui-models", str(models)]) == 0
    printed = capsys.readouterr().out
    assert "Glyph-ByT5 encoder (T5): q8_0 instead of q4_k" in printed
    assert "the VAE loads from the release folder models/glm_image/GLM-Image (present)" in printed
    with open(GGUF_WORKFLOW, encoding="utf-8") as f:
        graph = json.load(f)
    files = 0
    for node in graph.values():
        name = node["inputs"].get("checkpoint")
        if name is None:
            continue
        folder = NODES[node["class_type"]].FOLDER
        if (models / "glm_image" / name).is_dir():
            path = models / "glm_image" / name
        else:  # what ComfyUI resolves the name to: the file in the loader's folder
            path = models / folder / name
            assert path.is_file(), f"{node['class_type']} names {name}, which convert.py did not write in {folder}"
            assert (f"-> models/{folder}/{name}: used by glm_image_gguf_text_to_image.json "
                    f"({node['class_type']})") in printed
            files += 1
        node["inputs"]["checkpoint"] = str(path)
    assert files == 3  # AR, Glyph-ByT5, DiT
    ar_folder = models / "text_encoders" / "GLM-Image"
    assert (ar_folder / "tokenizer.json").is_file() and (ar_folder / "tokenizer_config.json").is_file()
    for node in graph.values():  # quick: 512x512, 2 steps
        if node["class_type"] == "GLMImageARSampler":
            node["inputs"].update(width=512, height=512)
        if node["class_type"] == "GLMImageDecoderSampler":
            node["inputs"].update(steps=2)
    (saved,) = Executor(NODES, str(tmp_path / "out")).run(graph)
    with Image.open(saved) as image:
        assert image.size == (512, 512)


def test_fp8_files_are_placed_and_named_but_no_template_uses_them(release, capsys):
    models, root = release
    other = models.parent / "fp8_models"
    assert convert.main([root, "--format", "fp8_e4m3fn", "--comfyui-models", str(other)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file()) == [
        "diffusion_models/GLM-Image_glm_image_dit_fp8_e4m3fn.safetensors",
        "text_encoders/GLM-Image/GLM-Image_glm_image_ar_fp8_e4m3fn.safetensors",
        "text_encoders/GLM-Image/GLM-Image_glyph_byt5_fp8_e4m3fn.safetensors",
        "text_encoders/GLM-Image/tokenizer.json", "text_encoders/GLM-Image/tokenizer_config.json"]
    assert "GLM-Image_glm_image_ar_fp8_e4m3fn.safetensors: no example workflow names it" in printed
    assert f"models/glm_image/GLM-Image (missing: move or link {root} there)" in printed


def test_the_glyph_stays_q8_0_only_below_8_bits():
    assert [component_format("glyph_byt5", f) for f in ("q4_k", "q5_k", "q4_0", "q6_k", "q8_0", "fp8_e4m3fn")] == [
        "q8_0", "q8_0", "q8_0", "q6_k", "q8_0", "fp8_e4m3fn"]
    assert component_format("glm_image_ar", "q4_k") == component_format("glm_image_dit", "q4_k") == "q4_k"


def test_a_component_folder_is_refused(release, capsys):
    models, root = release
    with pytest.raises(SystemExit) as exit_:
        convert.main([os.path.join(root, "transformer"), "--format", "q4_k", "--comfyui-models", str(models)])
    assert exit_.value.code == 2
    assert "--comfyui-models lays out a whole release, but" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([root, "--format", "q4_k", "--comfyui-models", str(models), "--out", str(models)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_destination_that_is_a_file_or_cannot_be_made_is_one_line(release, capsys, tmp_path):
    _, root = release
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for option in ("--out", "--comfyui-models"):
        with pytest.raises(SystemExit) as exit_:
            convert.main([root, "--format", "q8_0", option, str(a_file)])
        assert exit_.value.code == 2
        assert f"{a_file} is a file: a release is written into a folder" in capsys.readouterr().err
    # a folder below a file cannot be made: one line, exit code 2, no traceback
    assert convert.main([root, "--format", "q8_0", "--out", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convert.py: {a_file / 'sub'}") and "Traceback" not in err and len(err.splitlines()) == 1
