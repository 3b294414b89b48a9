"""What a LoRA costs at run time, as counts that do not depend on the machine (full-size configs of the release),
plus, with ``--tiny``, CPU times with and without a LoRA measured interleaved in this one run.

Counts, per typical LoRA (rank 32): the LoRA's own parameters, the weights it patches, and the traffic the
per-call patch adds (outside ComfyUI, and inside ComfyUI on FP8 / GGUF weights). A patched layer computes
``W' = W + s * up @ down`` every call (one ``addmm``): the temporary ``W'`` is written once and read once by the
layer's matmul, so each call moves 2 x |W'| more bytes than the unpatched layer and does ``2 * out * in * rank``
more FLOPs. The AR's decode step is bound by reading its weights, so "extra bytes / weight bytes read per token"
bounds its slowdown; the DiT at 1024x1024 is bound by its matmuls (about 4100 tokens per call), so its extra
FLOPs ratio is what counts. Inside ComfyUI plain weights are patched once per load instead (0 per call).

    python benchmarks/lora_cost.py            # the counts table of docs/performance.md
    python benchmarks/lora_cost.py --tiny     # plus CPU times on the tiny release (interleaved, median)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT,) if p not in sys.path]
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")

import torch  # noqa: E402
from glm_image_nodes.core.formats import reading  # noqa: E402
from glm_image_nodes.core.formats.lora_targets import AR, GLM_IMAGE_DIT, linear_shapes, load_lora  # noqa: E402
from glm_image_nodes.core.loading.lora_patches import AppliedLora, installed  # noqa: E402
from glm_image_nodes.core.models import cogview4_dit, glm_ar, glm_image_dit  # noqa: E402
from glm_image_nodes.testing.tiny_lora import write_tiny_loras  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402

CONFIGS = os.path.join(ROOT, "benchmarks", "configs")
RANK, BF16 = 32, 2
DIT_TOKENS = 4096 + 16  # 1024x1024 (64x64 patches) and a short text stream, per CFG branch
LORAS = {  # model -> (LoRA, the layer names it patches end with)
    "GLM-Image AR": [("attention (q, k, v, o)", ("q_proj", "k_proj", "v_proj", "o_proj")),
                     ("all linear", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"))],
    "GLM-Image DiT": [("attention (to_q/k/v/out)", ("to_q", "to_k", "to_v", "to_out.0")),
                      ("attention + feed-forward", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"))],
    "CogView4 DiT": [("attention + feed-forward", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"))],
}


def full_size_shapes() -> dict[str, dict[str, tuple[int, int]]]:
    """Linear layer shapes of the full-size models, built on the meta device from the release configs."""
    specs = {"GLM-Image AR": (glm_ar.SPEC, "full/vision_language_encoder/config.json"),
             "GLM-Image DiT": (glm_image_dit.SPEC, "full/transformer/config.json"),
             "CogView4 DiT": (cogview4_dit.SPEC, "cogview4_6b/transformer/config.json")}
    shapes = {}
    for name, (spec, file) in specs.items():
        raw = reading.read_json(os.path.join(CONFIGS, file))
        config = spec.config_from_dict(raw[spec.config_key] if spec.config_key else raw, file)
        with torch.device("meta"):
            shapes[name] = linear_shapes(spec.build(config))
    return shapes


def counts_table() -> list[str]:
    rows = ["| model | LoRA (rank 32) | LoRA params | weights patched | of all linear weights | extra bytes per "
            "forward, bf16 | AR: extra / weight bytes read per token | DiT: extra / layer FLOPs at 1024² |",
            "|---|---|---|---|---|---|---|---|"]
    for model, shapes in full_size_shapes().items():
        total = sum(o * i for o, i in shapes.values())
        for label, suffixes in LORAS[model]:
            patched = {n: s for n, s in shapes.items() if n.endswith(suffixes)}
            weights = sum(o * i for o, i in patched.values())
            lora = sum(RANK * (o + i) for o, i in patched.values())
            extra = 2 * weights * BF16
            ar = f"{extra / (total * BF16):.2f}" if model.endswith("AR") else "-"
            flops = "-" if model.endswith("AR") else f"{RANK / DIT_TOKENS:.4f}"
            rows.append(f"| {model} | {label} | {lora / 1e6:.1f} M | {weights / 1e9:.2f} B | {weights / total:.0%} "
                        f"| {extra / 2**30:.2f} GiB | {ar} | {flops} |")
    return rows


def median_ratio(run_base, run_lora, repeats: int) -> tuple[float, float]:
    base, lora = [], []
    for _ in range(repeats):  # interleaved
        for run, times in ((run_base, base), (run_lora, lora)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(base), statistics.median(lora)


def tiny_times(repeats: int) -> list[str]:
    from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
    from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
    from glm_image_nodes.core.stages.settings import ARSampling

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = write_tiny_release(os.path.join(folder, "release"))
        loras = write_tiny_loras(root, os.path.join(folder, "loras"))
        ar, tokenizer = glm_ar.load_ar_model(root, "fp32", "cpu"), load_text_tokenizer(root)
        dit = glm_image_dit.load_decoder(root, "fp32", "cpu")
        ar_lora = [AppliedLora(load_lora(loras["ar"], AR, ar), 1.0)]
        dit_lora = [AppliedLora(load_lora(loras["dit"], GLM_IMAGE_DIT, dit), 1.0)]

        def tokens(applied):  # an edit: a 16x16 target grid, 256 decode steps
            with installed(ar, applied):
                generate_token_grid(ar, tokenizer, "make it blue", 512, 512, settings=ARSampling(seed=0),
                                    progress=False,
                                    source_grids=[torch.zeros(16, 16, dtype=torch.long)])

        g = torch.Generator().manual_seed(0)
        x, glyph, ids = torch.randn(1, 16, 64, 64, generator=g), torch.randn(1, 8, 32), torch.zeros(1, 1024).long()

        def velocity(applied):
            with torch.no_grad(), installed(dit, applied):
                dit(x, glyph, ids, False, torch.tensor([500.0]), torch.tensor([[512.0, 512.0]]), torch.zeros(1, 2))

        rows = ["| tiny release, CPU, 1 thread | without LoRA (s) | with LoRA (s) | ratio |", "|---|---|---|---|"]
        for label, fn, applied in (("AR: 256 decode steps, LoRA on q/k/v/o", tokens, ar_lora),
                                   ("DiT: one forward at 512x512, LoRA on attention + ff", velocity, dit_lora)):
            base, lora = median_ratio(lambda: fn(()), lambda: fn(applied), repeats)
            rows.append(f"| {label} | {base:.4f} | {lora:.4f} | {lora / base:.3f} |")
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="also time the tiny release on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("\n".join(counts_table()))
    if args.tiny:
        print()
        print("\n".join(tiny_times(args.repeats)))
    print(f"\ntorch {torch.__version__}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
