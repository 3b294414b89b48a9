"""demo.py as a new user meets it: a first line before the slow imports, images numbered (never overwritten), the
tiny release cached and reused while intact, convert.py's files per component, and FP8 at load."""
import json
import os
import subprocess
import sys

import pytest
from glm_image_nodes.testing import tiny_release_cache
from PIL import Image

import convert
import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_LINE_PROBE = """
import builtins, sys
sys.path.insert(0, sys.argv[1])
real_import = builtins.__import__
def watching(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules:
        print("<importing torch>", flush=True)
    return real_import(name, *args, **kwargs)
builtins.__import__ = watching
import demo
sys.exit(demo.main(["--width", "1000"]))
"""


def test_the_first_line_comes_before_torch_is_imported():
    done = subprocess.run([sys.executable, "-c", FIRST_LINE_PROBE, ROOT], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["GLM-Image demo: loading PyTorch and the nodes ...", "<importing torch>"], done.stdout
    assert "The nearest valid size is 992x512" in done.stderr


def test_the_tiny_release_is_reused_while_intact(tmp_path):
    folder = str(tmp_path / "tiny_release")
    assert tiny_release_cache.ensure_tiny_release(folder) is True
    assert tiny_release_cache.ensure_tiny_release(folder) is False  # intact: reused as it is
    config = os.path.join(folder, "transformer", "config.json")
    with open(config, "a", encoding="utf-8") as f:
        f.write(" ")
    assert not tiny_release_cache.is_intact(folder)
    assert tiny_release_cache.ensure_tiny_release(folder) is True  # a changed file: written again
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    assert tiny_release_cache.ensure_tiny_release(folder) is True  # a missing file (an interrupted copy)
    assert tiny_release_cache.is_intact(folder)
    manifest = os.path.join(folder, tiny_release_cache.MANIFEST)
    with open(manifest, encoding="utf-8") as f:
        data = json.load(f)
    data["fingerprint"] = "written by an older pack"
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(data, f)
    assert tiny_release_cache.ensure_tiny_release(folder) is True
    assert [n for n in os.listdir(tmp_path) if n != "tiny_release"] == []  # nothing left beside it


def test_component_paths_need_a_source_for_the_rest(tmp_path, capsys):
    for argv, message in (
            (["--dit", str(tmp_path / "nowhere.gguf")], "--dit " + str(tmp_path / "nowhere.gguf") + " does not exist"),
            (["--dit", str(tmp_path)], "--ar, --glyph, --vae not given: add --weights with the release folder")):
        with pytest.raises(SystemExit) as exit_:
            demo.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_fp8_at_load_then_converted_files_numbered_in_one_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "images"
    assert demo.main(["--dtype", "fp8_e4m3fn", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny random GLM-Image release written to" in printed
    release = demo.cache_folder()
    graph = demo.build_graph(release, demo.parse_args(["--dtype", "fp8_e4m3fn"]))
    assert {n["class_type"]: n["inputs"]["dtype"] for n in graph.values() if "dtype" in n["inputs"]} == {
        "GLMImageARLoader": "fp8_e4m3fn", "GLMImageGlyphEncoderLoader": "fp8_e4m3fn",
        "GLMImageDecoderLoader": "fp8_e4m3fn", "GLMImageVAELoader": "auto"}

    models = tmp_path / "models"
    assert convert.main([release, "--format", "q4_k", "--comfyui-models", str(models)]) == 0
    text = models / "text_encoders" / "tiny_release"
    files = ["--ar", str(text / "tiny_release_glm_image_ar_q4_k.gguf"),
             "--glyph", str(text / "tiny_release_glyph_byt5_q8_0.gguf"),
             "--dit", str(models / "diffusion_models" / "tiny_release_glm_image_dit_q4_k.gguf")]
    capsys.readouterr()
    assert demo.main(["--weights", release, *files, "--width", "512", "--height", "512", "--steps", "2",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny random" not in printed  # --weights: the release is used as given
    graph = demo.build_graph(release, demo.parse_args(["--weights", release, *files]))
    assert {n["class_type"]: n["inputs"]["checkpoint"] for n in graph.values() if "checkpoint" in n["inputs"]} == {
        "GLMImageARLoader": files[1], "GLMImageGlyphEncoderLoader": files[3], "GLMImageDecoderLoader": files[5],
        "GLMImageVAELoader": release}
    assert sorted(p.name for p in out.iterdir()) == ["GLMImage_00000.png", "GLMImage_00001.png"]  # not overwritten
    for png in out.iterdir():
        with Image.open(png) as image:
            assert image.size == (512, 512)
    assert f"wrote {out / 'GLMImage_00001.png'}" in printed
