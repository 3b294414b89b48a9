"""The DiT step cache's speed/quality trade-off: for each threshold, the share of steps whose blocks after the
first were skipped, the time of the decoder loop against the cache off (measured interleaved in one run), and
the PSNR of the decoded image against the image without the cache (same seed, tokens and glyph).

``--size tiny`` (default) runs the tiny random release on the CPU (its images are noise, so the PSNR shows
how far the cache moves the output, not a perceived quality); ``--size full`` builds the release's DiT and VAE
configs with random weights on the GPU for seconds per step (its PSNR says no more).

    python benchmarks/step_cache.py                               # tiny, CPU, 512x512, 50 steps
    python benchmarks/step_cache.py --size full --device cuda --height 1024 --width 1024 --steps 20
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")

import torch  # noqa: E402
from bench_glm_image import CONFIGS, build_pack_module  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig, load_decoder  # noqa: E402
from glm_image_nodes.core.models.vae import AutoencoderKL, GlmVAE, VAEConfig, load_vae  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import sample_latents  # noqa: E402
from glm_image_nodes.core.stages.handles import GlyphConditioning  # noqa: E402
from glm_image_nodes.core.stages.settings import DecoderRun  # noqa: E402
from glm_image_nodes.testing.images import psnr  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402


def models(args, device: torch.device):
    if args.size == "tiny":
        folder = write_tiny_release(tempfile.mkdtemp(prefix="glm_tiny_"))
        return load_decoder(folder, dtype="fp32", device=device), load_vae(folder, dtype="fp32", device=device)
    dtype = torch.bfloat16
    with open(os.path.join(CONFIGS, "full", "transformer", "config.json"), encoding="utf-8") as f:
        dit_config = GlmImageDiTConfig.from_dict(json.load(f))
    with open(os.path.join(CONFIGS, "full", "vae", "config.json"), encoding="utf-8") as f:
        vae_config = VAEConfig.from_dict(json.load(f))
    dit = build_pack_module(lambda: GlmImageDiT(dit_config), device, dtype, args.seed)
    vae = GlmVAE(build_pack_module(lambda: AutoencoderKL(vae_config), device, dtype, args.seed))
    return dit, vae


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--thresholds", default="0,0.02,0.05,0.1,0.2,0.3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else None
    device = torch.device(args.device)
    dit, vae = models(args, device)
    g = torch.Generator().manual_seed(args.seed)
    dim = dit.config.text_embed_dim
    glyph = GlyphConditioning(cond=torch.randn(1, 12, dim, generator=g), uncond=torch.randn(1, 1, dim, generator=g))
    ids = torch.randint(0, dit.codebook_size, (1, (args.height // 16) * (args.width // 16)), generator=g)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if thresholds[0] != 0:
        thresholds.insert(0, 0.0)

    skipped = {}

    def run(threshold: float):
        calls = []
        hook = dit.transformer_blocks[-1].register_forward_hook(lambda *a: calls.append(1))
        try:
            settings = DecoderRun(steps=args.steps, seed=args.seed, step_cache=threshold)
            latents = sample_latents(dit, ids, glyph, args.height, args.width, settings, progress=False)
        finally:
            hook.remove()
        skipped[threshold] = 1 - len(calls) / args.steps
        return latents

    def timed(threshold: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter() if device.type == "cuda" else time.thread_time()
        run(threshold)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter() - start
        return time.thread_time() - start

    images = {t: vae.decode(run(t)) for t in thresholds}
    times = collections.defaultdict(list)
    for _ in range(args.repeats):
        for t in thresholds:
            times[t].append(timed(t))
    base = statistics.median(times[0.0])
    rows = [{"threshold": t, "steps_skipped": skipped[t], "seconds_per_step": statistics.median(times[t]) / args.steps,
             "time_vs_off": statistics.median(times[t]) / base, "psnr_db_vs_off": psnr(images[t], images[0.0])}
            for t in thresholds]
    result = {"meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "args": vars(args)}, "rows": rows}
    print("| step_cache | steps with blocks skipped | s/step | time / off | PSNR vs off (dB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']:g} | {100 * r['steps_skipped']:.0f}% | {r['seconds_per_step']:.4f} | "
              f"{r['time_vs_off']:.3f} | {r['psnr_db_vs_off']:.1f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
