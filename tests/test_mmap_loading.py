"""Loading keeps the weights memory-mapped: measured by RSS in a fresh subprocess (anonymous memory vs file-backed
pages of the checkpoint), for a bf16 safetensors file loaded in bf16 and for a GGUF file."""
import json
import os
import subprocess
import sys

import pytest
import torch
from glm_image_nodes.core.convert import conversion
from glm_image_nodes.core.models import glm_image_dit
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GlmImageDiTConfig(num_layers=6, attention_head_dim=64, num_attention_heads=8, text_embed_dim=64,
                           time_embed_dim=64, condition_dim=16)
MIB = 1 << 20

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from standalone import register_pack
register_pack()
import torch
torch.set_num_threads(1)
from glm_image_nodes.core.models.glm_image_dit import load_decoder

def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

import ctypes
import gc
warm = load_decoder(sys.argv[2], sys.argv[3], "cpu")  # imports and one-time caches are not the weights
del warm
gc.collect()
trim = ctypes.CDLL("libc.so.6").malloc_trim
trim(0)  # give the warm-up's freed memory back, or a copy made again could hide in it
before = rss()
model = load_decoder(sys.argv[2], sys.argv[3], "cpu")
loaded = rss()
# page every weight in (one element per 2 KiB) without making copies of it
for t in model.state_dict().values():
    flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
    flat[::2048].sum()
touched = rss()
trim(0)  # hand freed temporaries back: what stays is what the model holds
held = rss()
state = model.state_dict().values()
fp8_bytes = sum(t.numel() for t in state if t.dtype == torch.float8_e4m3fn)
converted = sum(t.numel() * t.element_size() for t in state if t.dtype != torch.bfloat16)  # not the file's dtype
print(json.dumps({"before": before, "loaded": loaded, "touched": touched, "held": held, "fp8_bytes": fp8_bytes,
                  "converted_bytes": converted}))
"""


def measure(path: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, ROOT, path, dtype], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmap")
    generator = torch.Generator().manual_seed(0)
    model = GlmImageDiT(CONFIG)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.bfloat16) for k, v in
             model.state_dict().items()}
    plain = folder / "transformer"
    plain.mkdir()
    save_file(state, str(plain / "diffusion_pytorch_model.safetensors"))
    (plain / "config.json").write_text(json.dumps({"_class_name": "GlmImageTransformer2DModel",
                                                   **CONFIG.__dict__}))
    gguf_file = str(folder / "dit_q8_0.gguf")
    conversion.convert_component(glm_image_dit.SPEC, str(plain), "q8_0", gguf_file)
    return {"plain": str(plain), "gguf": gguf_file,
            "bytes": sum(t.numel() * 2 for t in state.values())}


@pytest.mark.parametrize("kind,dtype", [("plain", "bf16"), ("gguf", "bf16")])
def test_loading_maps_the_file_instead_of_copying_it(files, kind, dtype):
    size = files["bytes"] if kind == "plain" else os.path.getsize(files["gguf"])
    got = measure(files[kind], dtype)
    anon = got["touched"]["RssAnon"] - got["before"]["RssAnon"]
    mapped = got["touched"]["RssFile"] - got["before"]["RssFile"]
    print(f"{kind}: weights {size / MIB:.1f} MiB, anonymous +{anon / MIB:.1f} MiB, file-backed +{mapped / MIB:.1f} MiB")
    # a copy of the weights would add `size` anonymous bytes; what is allowed is the loader's own bookkeeping
    assert anon < 0.2 * size + 16 * MIB, (anon, size)
    assert mapped > 0.8 * size, (mapped, size)  # the weights are the checkpoint's own pages


def test_fp8_at_load_holds_only_the_fp8_copy(files):
    got = measure(files["plain"], "fp8_e4m3fn")
    held = got["held"]["RssAnon"] - got["before"]["RssAnon"]
    print(f"fp8 at load: float8 weights {got['fp8_bytes'] / MIB:.1f} MiB, all converted tensors "
          f"{got['converted_bytes'] / MIB:.1f} MiB, anonymous held +{held / MIB:.1f} MiB")
    # the block weights become float8 (new memory, half of bf16); on the CPU the compute dtype is fp32, so the
    # kept tensors are converted too; what keeps the file's dtype stays mapped from the file, never copied
    assert got["fp8_bytes"] > 0.5 * files["bytes"] / 2
    assert held < 1.1 * got["converted_bytes"] + 16 * MIB, (held, got["converted_bytes"])
    assert got["converted_bytes"] < files["bytes"]
