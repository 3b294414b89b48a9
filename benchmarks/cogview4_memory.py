"""CogView4-6B peak GPU memory through the pack's nodes, with stage swapping (1024x1024, bf16 by default).

Runs the node sequence a ComfyUI user runs: text encoder loader -> text encode (prompt and negative prompt)
-> decoder loader -> sampler -> VAE loader (CogView4's VAE: scaling 1.0) -> VAE decode. The loaders' outputs
are built in memory instead of read from disk: the same modules in the same wrapper types, on the offload
device (the CPU) in the chosen dtype, with seeded random weights drawn in place (meta -> ``to_empty`` ->
init, the helpers of ``bench_glm_image.py``). The encode, sample and decode nodes are the real ones: each
moves its model to the GPU only while it runs (``host.memory.on_compute_device``), and that is measured.

Per stage: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (reset before the stage) and what
is still allocated after it; the overall peak is the largest stage peak. A measurement: nothing is asserted.
The prompts are as long as CogView4 allows by default (1024 tokens each, so CFG runs as one batch of 2), the
worst case for the sampler; the tokenizer is the pack's tiny GLM-4 one, so only the token counts are real.

    python benchmarks/cogview4_memory.py --size full --out cogview4_memory.json     # one GPU, a few minutes
    python benchmarks/cogview4_memory.py --size tiny --device cpu --height 512 --width 512 --prompt-tokens 32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
import torch

# bench_glm_image puts the repository on sys.path and registers the pack as glm_image_nodes (imported below)
from bench_glm_image import (
    build_pack_module,
    free_memory,
    peak_gib,
    reset_peak,
    weights_gib,
)
from glm_image_nodes.core.formats.reading import read_json
from glm_image_nodes.core.models.cogview4_dit import CogView4DiT, CogView4DiTConfig
from glm_image_nodes.core.models.glm_text_encoder import GlmConfig, GlmTextEncoder
from glm_image_nodes.core.models.vae import AutoencoderKL, GlmVAE, VAEConfig
from glm_image_nodes.core.runtime import devices
from glm_image_nodes.core.stages import handles
from glm_image_nodes.core.stages.cogview4_text import CogView4Tokenizer, load_cogview4_tokenizer
from glm_image_nodes.core.stages.flow_schedule import read_shift_settings
from glm_image_nodes.nodes.sampling.cogview4 import (
    GLMImageCogView4Sampler,
    GLMImageCogView4TextEncode,
)
from glm_image_nodes.nodes.sampling.vae import GLMImageVAEDecode
from glm_image_nodes.testing.tiny_glm4_tokenizer import write_tiny_glm4_tokenizer

CONFIGS = os.path.join(BENCHMARKS, "configs", "cogview4_6b")  # the release's config files
COMPONENTS = ("text_encoder", "transformer", "vae")
# The CPU smoke run's models: the release's configs with these fields replaced.
TINY = {
    "text_encoder": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "transformer": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "text_embed_dim": 64,
                    "time_embed_dim": 32, "condition_dim": 16},
    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
}
STAGES = {  # stage -> the node a ComfyUI user runs there
    "text_encoder_loader": "GLMImageCogView4TextEncoderLoader",
    "text_encode": "GLMImageCogView4TextEncode",
    "decoder_loader": "GLMImageCogView4DecoderLoader",
    "sampler": "GLMImageCogView4Sampler",
    "vae_loader": "GLMImageVAELoader",
    "vae_decode": "GLMImageVAEDecode",
}
BUDGET_GIB = 24
PROMPT = "A red fox curled up asleep in fresh snow under a birch tree, golden hour, 85mm photo, fine fur detail,"
NEGATIVE = "blurry, low quality, deformed, oversaturated, watermark, jpeg artifacts, extra limbs, bad anatomy,"
GIB = 2 ** 30


# ---- the loaders' outputs, without files -------------------------------------------------------------------------
def release_configs(size: str) -> dict[str, dict]:
    """Each component's config.json: the release's (``full``) or the release's with ``TINY`` applied."""
    configs = {name: read_json(os.path.join(CONFIGS, name, "config.json")) for name in COMPONENTS}
    if size == "tiny":
        configs = {name: {**config, **TINY[name]} for name, config in configs.items()}
    return configs


def make_text_encoder(configs: dict) -> GlmTextEncoder:
    return GlmTextEncoder(GlmConfig.from_dict(configs["text_encoder"], "text_encoder/config.json"))


def make_decoder(configs: dict) -> CogView4DiT:
    """The config as the loader reads it: the release's values for the fields the DiT reads."""
    return CogView4DiT(CogView4DiTConfig.from_dict(configs["transformer"], "transformer/config.json"))


def make_vae(configs: dict) -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_dict(configs["vae"], "vae/config.json"))


def text_encoder_loader(configs: dict, tokenizer_folder: str, dtype: torch.dtype,
                        seed: int) -> handles.CogView4TextEncoder:
    """What GLMImageCogView4TextEncoderLoader returns: GLM-4 without its last layer and final norm, and the
    tokenizer, on the offload device."""
    model = build_pack_module(lambda: make_text_encoder(configs), devices.offload_device(), dtype, seed,
                              key=lambda name: "text_encoder.model." + name)
    return handles.CogView4TextEncoder(model=model, tokenizer=load_cogview4_tokenizer(tokenizer_folder),
                                       blocks="layers")


def decoder_loader(configs: dict, dtype: torch.dtype, seed: int) -> handles.Decoder:
    """What GLMImageCogView4DecoderLoader returns: the DiT with the release's scheduler settings."""
    model = build_pack_module(lambda: make_decoder(configs), devices.offload_device(), dtype, seed,
                              key=lambda name: "transformer." + name)
    return handles.Decoder(model, shift_settings=read_shift_settings(CONFIGS), blocks="transformer_blocks")


def vae_loader(configs: dict, dtype: torch.dtype, seed: int) -> handles.ModelHandle:
    """What GLMImageVAELoader returns for CogView4's vae/ folder (its config: scaling 1.0, shift 0.0)."""
    return handles.ModelHandle(GlmVAE(build_pack_module(lambda: make_vae(configs), devices.offload_device(),
                                                        dtype, seed, key=lambda name: "vae." + name)))


# ---- measuring ------------------------------------------------------------------------------------------------------
def compute_device(choice: str) -> torch.device:
    """The nodes run on ``devices.get_device()``; ``--device`` checks it (and for ``cuda:N`` selects it)."""
    if choice != "auto":
        wanted = torch.device(choice)
        if wanted.type == "cuda" and wanted.index is not None and torch.cuda.is_available():
            torch.cuda.set_device(wanted)
    device = devices.get_device()
    if choice != "auto" and torch.device(choice).type != device.type:
        hint = " or hide the GPU (CUDA_VISIBLE_DEVICES=) to run on the CPU" if device.type == "cuda" else ""
        raise SystemExit(f"--device {choice}: the pack's nodes run on {device} on this machine "
                         f"(devices.get_device()). Use --device {device.type}{hint}.")
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def gpu_gib(device: torch.device, figure) -> float | None:
    return figure(device) / GIB if device.type == "cuda" else None


def run_stage(device: torch.device, stages: dict, name: str, run):
    """Run one node's work from a clean allocator state; record its peaks and what it left allocated."""
    free_memory(device)
    reset_peak(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stages[name] = {"node": STAGES[name], "time_s": time.perf_counter() - start, "peak_gib": peak_gib(device),
                    "peak_reserved_gib": gpu_gib(device, torch.cuda.max_memory_reserved),
                    "allocated_after_gib": gpu_gib(device, torch.cuda.memory_allocated)}
    print(f"{name}: {stages[name]['time_s']:.1f} s", file=sys.stderr, flush=True)
    return result


def model_record(module: torch.nn.Module) -> dict:
    """Size and placement of a model once its node has run (back on the offload device if it swapped)."""
    first = next(module.parameters())
    return {"params": sum(p.numel() for p in module.parameters()), "weights_gib": weights_gib(module),
            "dtype": str(first.dtype).removeprefix("torch."), "device_after_run": str(first.device)}


def prompt_of_tokens(tokenizer: CogView4Tokenizer, tokens: int, text: str) -> str:
    """The most words of ``text`` (repeated) whose ids, the ``[gMASK]<sop>`` prefix included, are at most
    ``tokens`` long: CogView4 then left-pads them to a multiple of 16."""
    words = (text.split() * (tokens // len(text.split()) + 1))[:tokens]  # a word is at least one token
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.tokenizer.encode(" ".join(words[:mid])).ids) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(report: dict) -> str:
    lines = ["| Stage | Node | Peak allocated (GiB) | Peak reserved (GiB) | Allocated after (GiB) | Time (s) |",
             "|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['node']} | {fmt(s['peak_gib'])} | {fmt(s['peak_reserved_gib'])} | "
                     f"{fmt(s['allocated_after_gib'])} | {s['time_s']:.1f} |")
    lines.append(f"| **overall** | | **{fmt(report['overall_peak_gib'])}** | "
                 f"{fmt(report['overall_peak_reserved_gib'])} | | |")
    fits = report["fits_24_gib"]
    verdict = "no GPU figure" if fits is None else f"{'fits' if fits else 'does NOT fit'} in {BUDGET_GIB} GiB"
    return "\n".join(lines) + f"\n\nOverall peak allocated: {verdict} ({report['meta']['device_name']})."


# ---- the run --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="the release's configs, or small ones")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (must be where the nodes run)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights, as the loaders' dtype widget")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="memory does not depend on it")
    p.add_argument("--guidance", type=float, default=5.0, help="> 1 runs CFG (the release's 5.0)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in ids (CogView4's maximum 1024)")
    p.add_argument("--negative-tokens", type=int, default=None,
                   help="negative prompt length (default: as the prompt, so CFG runs as one batch of 2)")
    p.add_argument("--tiling", choices=("auto", "on", "off"), default="auto", help="the VAE Decode node's widget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="cogview4_memory.json")
    args = p.parse_args(argv)
    if args.negative_tokens is None:
        args.negative_tokens = args.prompt_tokens
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = compute_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.size == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread beats several busy ones
    configs = release_configs(args.size)
    free_memory(device)
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    stages, models = {}, {}

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_folder = write_tiny_glm4_tokenizer(os.path.join(tmp, "tokenizer"))
        text_encoder = run_stage(device, stages, "text_encoder_loader",
                                 lambda: text_encoder_loader(configs, tokenizer_folder, dtype, args.seed))
    prompt = prompt_of_tokens(text_encoder.tokenizer, args.prompt_tokens, PROMPT)
    negative = prompt_of_tokens(text_encoder.tokenizer, args.negative_tokens, NEGATIVE)
    (conditioning,) = run_stage(device, stages, "text_encode",
                                lambda: GLMImageCogView4TextEncode().encode(text_encoder, prompt, negative))
    models["text_encoder"] = model_record(text_encoder.model)

    decoder = run_stage(device, stages, "decoder_loader", lambda: decoder_loader(configs, dtype, args.seed))
    (latent,) = run_stage(device, stages, "sampler", lambda: GLMImageCogView4Sampler().sample(
        decoder, conditioning, args.width, args.height, args.seed, args.steps, args.guidance, 1))
    models["transformer"] = model_record(decoder.model)

    vae = run_stage(device, stages, "vae_loader", lambda: vae_loader(configs, dtype, args.seed))
    (image,) = run_stage(device, stages, "vae_decode", lambda: GLMImageVAEDecode().decode(vae, latent, args.tiling))
    models["vae"] = model_record(vae.module)

    peaks = [s["peak_gib"] for s in stages.values()]
    overall = max(peaks) if device.type == "cuda" else None
    report = {
        "meta": {"device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine(),
                 "torch": torch.__version__, "python": platform.python_version(),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
                 "mem_get_info_start_gib": None if free is None else {"free": free / GIB, "total": total / GIB}},
        "sizes": {"size": args.size, "dtype": args.dtype, "height": args.height, "width": args.width,
                  "steps": args.steps, "guidance": args.guidance,
                  "prompt_tokens": conditioning.cond.shape[1], "negative_tokens": conditioning.uncond.shape[1],
                  "latent_shape": list(latent["samples"].shape), "image_shape": list(image.shape)},
        "models": models,
        "stages": stages,
        "overall_peak_gib": overall,
        "overall_peak_reserved_gib": max(s["peak_reserved_gib"] for s in stages.values()) if overall is not None
        else None,
        "budget_gib": BUDGET_GIB,
        "fits_24_gib": None if overall is None else overall <= BUDGET_GIB,
    }
    report["table"] = markdown_table(report)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
