"""Refusals of weight files say what the file is and give a fix that works on that very file."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.models import glm_image_dit
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.testing.tiny_release import write_tiny_release
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(str(tmp_path_factory.mktemp("errors") / "tiny"))


def dit_state(release):
    return load_file(os.path.join(release, "transformer", "diffusion_pytorch_model.safetensors"))


def run_suggested(message: str) -> str:
    """Run the ``python convert.py ...`` command a message suggests (up to the next ". " or the end)."""
    start = message.index("python convert.py")
    command = message[start:].split(". The file:")[0].rstrip(".")
    args = shlex.split(command)[2:]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return args[args.index("--out") + 1]


def test_fp8_choice_on_a_gguf_gives_a_command_that_makes_the_fp8_file(release, tmp_path):
    path = str(tmp_path / "dit q8.gguf")   # a space: the command must quote it
    conversion.convert_component(glm_image_dit.SPEC, release, "q8_0", path)
    with pytest.raises(CheckpointError) as refused:
        load_decoder(path, "fp8_e4m3fn", "cpu")
    message = str(refused.value)
    assert "GGUF Q8_0" in message and "stored as F32 x" in message and "'glm_image_dit'" in message
    out = run_suggested(message)
    assert load_decoder(out, "fp8_e4m3fn", "cpu").transformer_blocks[0].attn1.to_q.weight_kind == "fp8"


def test_a_file_of_another_component_names_its_prefix_and_types(release, tmp_path):
    glyph = load_file(os.path.join(release, "text_encoder", "model.safetensors"))
    path = str(tmp_path / "glyph_from_comfyui.safetensors")
    save_file({"cond_stage_model.transformer." + k: v for k, v in glyph.items()}, path)
    with pytest.raises(CheckpointError, match=r"is not a GLM-Image DiT checkpoint.*The file: safetensors with 21 "
                                              r"tensors; stored as F32 x21; ComfyUI key prefix "
                                              r"'cond_stage_model.transformer.' taken off"):
        load_decoder(path, "fp32", "cpu")
    shutil.copy(os.path.join(release, "transformer", "config.json"), tmp_path / "config.json")
    (tmp_path / "config").mkdir()  # the same file in a folder with the DiT's config: the keys decide
    shutil.copy(path, tmp_path / "config" / "model.safetensors")
    shutil.copy(tmp_path / "config.json", tmp_path / "config" / "config.json")
    with pytest.raises(CheckpointError, match=r"does not match GlmImageDiT.*choose the loader of the component it "
                                              r"holds\. The file: safetensors with 21 tensors"):
        load_decoder(str(tmp_path / "config"), "fp32", "cpu")


def test_integer_tensor_is_refused_with_its_name(release, tmp_path):
    state = dit_state(release)
    state["transformer_blocks.0.attn1.to_k.weight"] = state["transformer_blocks.0.attn1.to_k.weight"].to(torch.int64)
    path = str(tmp_path / "dit_int.safetensors")
    save_file(state, path)
    shutil.copy(os.path.join(release, "transformer", "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"tensor transformer_blocks.0.attn1.to_k.weight is stored as int64"):
        load_decoder(path, "fp32", "cpu")
    with pytest.raises(CheckpointError, match=r"tensor transformer_blocks.0.attn1.to_k.weight is stored as int64"):
        conversion.convert_component(glm_image_dit.SPEC, path, "q8_0", str(tmp_path / "out.gguf"))


def test_single_file_reads_the_config_json_its_error_asks_for(release, tmp_path):
    """The tiny DiT's inner dim (64) is no multiple of the default head_dim (128): shapes cannot give the config."""
    path = str(tmp_path / "dit.safetensors")
    shutil.copy(os.path.join(release, "transformer", "diffusion_pytorch_model.safetensors"), path)
    with pytest.raises(CheckpointError, match="put the transformer's config.json beside the weights"):
        load_decoder(path, "fp32", "cpu")
    shutil.copy(os.path.join(release, "transformer", "config.json"), tmp_path / "config.json")
    loaded = load_decoder(path, "fp32", "cpu").state_dict()
    want = load_decoder(release, "fp32", "cpu").state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.items())
