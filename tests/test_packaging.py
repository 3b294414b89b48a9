"""``pip install .`` of the flat layout: the wheel holds the package glm_image_nodes (every subpackage, the example
workflows, the LICENSE), declares the caption extra, and works installed, away from the checkout."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

pytest.importorskip("setuptools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source tree (build/, *.egg-info): build from a copy, not the checkout
    source = tmp_path_factory.mktemp("source") / "glm-image-nodes"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", "outputs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def test_license_is_the_declared_apache_2(wheel):
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read("glm_image_nodes-0.1.0.dist-info/METADATA").decode()
        assert "License-Expression: Apache-2.0" in metadata
        assert "glm_image_nodes-0.1.0.dist-info/licenses/LICENSE" in whl.namelist()


def test_wheel_holds_the_package_and_its_data(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read("glm_image_nodes-0.1.0.dist-info/METADATA").decode()
    sources = [os.path.relpath(p, ROOT) for sub in ("core", "nodes", "headless", "serving", "testing")
               for p in glob.glob(os.path.join(ROOT, sub, "**", "*.py"), recursive=True)]
    workflows = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "example_workflows", "**", "*.json"),
                                                             recursive=True)]
    locales = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "locales", "*", "*.json"))]
    assert locales
    missing = [p for p in sources + workflows + locales + ["__init__.py", "LICENSE"]
               if f"glm_image_nodes/{p}" not in names]
    assert not missing, missing
    assert not [n for n in names if n.startswith(("glm_image_nodes/tests/", "glm_image_nodes/benchmarks/"))]
    assert 'Requires-Dist: transformers<5.24,>=5.23; extra == "caption"' in metadata  # the parity tests' 5.23


def test_installed_package_imports_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
                   check=True, capture_output=True)
    code = ("import os, glm_image_nodes, glm_image_nodes.demo as demo\n"
            "assert os.path.dirname(glm_image_nodes.__file__) != " + repr(ROOT) + "\n"
            "print(len(glm_image_nodes.NODE_CLASS_MAPPINGS), os.path.isfile(demo.WORKFLOW))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
    assert run.stdout.split() == [str(len(NODE_CLASS_MAPPINGS)), "True"]
    client = subprocess.run([sys.executable, "-m", "glm_image_nodes.headless.client", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert client.returncode == 0 and "API-format workflow JSON" in client.stdout
    # the installed client is stdlib-only: importing it (and so the package) does not import torch
    quick = subprocess.run([sys.executable, "-c", "import sys, glm_image_nodes.headless.client\n"
                            "print('torch' in sys.modules)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert quick.returncode == 0 and quick.stdout.split() == ["False"], quick.stderr
    serve = subprocess.run([sys.executable, "-m", "glm_image_nodes.serving.cli", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert serve.returncode == 0 and "--max-batch" in serve.stdout, serve.stderr


def test_every_console_script_answers_help_installed(wheel, tmp_path):
    """Each [project.scripts] entry is in the wheel's entry points and its target, imported from the installed
    package away from the checkout, prints its --help."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    with zipfile.ZipFile(wheel) as whl:
        entry_points = whl.read("glm_image_nodes-0.1.0.dist-info/entry_points.txt").decode()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    for name, target in scripts.items():
        assert f"{name} = {target}" in entry_points, (name, entry_points)
        module, function = target.split(":")
        code = f"import sys; from {module} import {function}; sys.exit({function}(['--help']))"
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0 and "usage:" in run.stdout, (name, run.stderr[-2000:])


def test_requirements_and_readme_test_command_match_pyproject():
    """requirements.txt (ComfyUI users: ComfyUI brings torch) is pyproject's dependencies without torch, and the
    README's test install command names exactly the test extra, as .ci/run installs it."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert requirements == [d for d in project["dependencies"] if not d.startswith("torch")]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    command = readme.split("pip install torch==2.13.0 && pip install -r requirements.txt", 1)[1].split("\nruff", 1)[0]
    named = command.replace("\\\n", " ").replace('"', "").split()
    assert sorted(named) == sorted(project["optional-dependencies"]["test"]), named
