"""Weight formats of GLM-Image: bytes, RAM while loading, and the distance to bf16, per component and format.

    python benchmarks/memory.py --tiny                                  # CPU, the tiny random release (CI-sized)
    python benchmarks/memory.py --tiny --formats q8_0,fp8_e4m3fn        # a subset
    python benchmarks/memory.py --release /models/GLM-Image --device cuda --formats fp8_e4m3fn,q4_k   # real weights
    python benchmarks/memory.py --bytes-per-token                       # bytes moved per AR token per format

For each component (AR model, DiT decoder, Glyph-ByT5) and format the release is converted with convert.py's code,
loaded with the pack's loaders (peak and settled RAM sampled from /proc while loading), and compared with the
release loaded in bf16 (the reference):
- AR: logits over a 256-token greedy walk of the reference (teacher-forced): cosine, max abs, top-1 agreement;
- DiT: velocity of one forward at 512x512 (relative error); Glyph-ByT5: embeddings (relative error);
- end to end: the 512x512 image of AR -> glyph -> decoder (4 steps) -> VAE with every component in the format,
  PSNR against the bf16 image (sampling makes small logit differences pick other tokens: this is drift, not noise).
``--size`` changes the 512 (the tests use 128) and ``--vae-dtype fp32`` decodes in fp32: the VAE is the same for
every format, and bf16 convolutions are ~100x slower than fp32 on CPUs without AVX512-BF16.
Full-size weight bytes per format come from the real configs (shapes on the meta device, nothing built).
The last line: ``formats: N checked, worst AR logits cosine C, worst DiT relative error E``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from standalone import register_pack  # noqa: E402

register_pack()
from glm_image_nodes.core.convert import conversion  # noqa: E402
from glm_image_nodes.core.formats import reading  # noqa: E402
from glm_image_nodes.core.loading import components  # noqa: E402
from glm_image_nodes.core.models import cogview4_dit, glm_ar, glm_image_dit, glm_text_encoder, t5_encoder  # noqa: E402
from glm_image_nodes.core.models.vae import load_vae  # noqa: E402
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer  # noqa: E402
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid  # noqa: E402
from glm_image_nodes.core.stages.decoder_sampling import sample_latents  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import release_shift_settings  # noqa: E402
from glm_image_nodes.core.stages.glyph import glyph_conditioning  # noqa: E402
from glm_image_nodes.core.stages.settings import ARSampling, DecoderRun  # noqa: E402
from glm_image_nodes.testing.images import psnr  # noqa: E402

FORMATS = ("fp8_at_load", "fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
COMPONENTS = {"ar": glm_ar.SPEC, "dit": glm_image_dit.SPEC, "glyph": t5_encoder.SPEC}
CONFIGS = os.path.join(ROOT, "benchmarks", "configs")
FULL_SIZE = {  # spec, its config.json in the repo's copies of the release configs
    "GLM-Image AR": (glm_ar.SPEC, os.path.join(CONFIGS, "full", "vision_language_encoder", "config.json")),
    "GLM-Image DiT": (glm_image_dit.SPEC, os.path.join(CONFIGS, "full", "transformer", "config.json")),
    "Glyph-ByT5": (t5_encoder.SPEC, os.path.join(CONFIGS, "full", "text_encoder", "config.json")),
    "CogView4 text encoder": (glm_text_encoder.SPEC, os.path.join(CONFIGS, "cogview4_6b", "text_encoder",
                                                                  "config.json")),
    "CogView4 DiT": (cogview4_dit.SPEC, os.path.join(CONFIGS, "cogview4_6b", "transformer", "config.json")),
}
WALK = 256
PROMPT = 'A poster that says "formats"'
MIB, GB = 1 << 20, 1e9


# ---- full-size figures ---------------------------------------------------------------------------------------
def full_size_bytes() -> dict[str, dict[str, int]]:
    """Bytes of every component in each format at real size, from the shapes of the meta-built model."""
    out = {}
    for name, (spec, path) in FULL_SIZE.items():
        raw = reading.read_json(path)
        config = spec.config_from_dict(raw[spec.config_key] if spec.config_key else raw, path)
        with torch.device("meta"):
            model = spec.build(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out[name] = {fmt: sum(conversion.stored_bytes(fmt, spec.quantize(k, s), s) for k, s in shapes.items())
                     for fmt in ("source", "fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")}
    return out


# ---- RAM while loading -----------------------------------------------------------------------------------------
def rss() -> dict[str, int] | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}


class PeakRSS:
    """Samples /proc/self/status every millisecond while the block runs: peak anonymous and file-backed RSS."""

    def __enter__(self):
        self.base = rss()
        self.peak = dict(self.base) if self.base else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self.peak is not None and not self._stop.wait(0.001):
            now = rss()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], now[k])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = rss()

    def figures(self) -> dict[str, float | None]:
        if self.base is None:
            return {"peak_anon_mib": None, "peak_mapped_mib": None, "after_anon_mib": None}
        return {"peak_anon_mib": (self.peak["RssAnon"] - self.base["RssAnon"]) / MIB,
                "peak_mapped_mib": (self.peak["RssFile"] - self.base["RssFile"]) / MIB,
                "after_anon_mib": (self.after["RssAnon"] - self.base["RssAnon"]) / MIB}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- distances ---------------------------------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def positions(n: int) -> torch.Tensor:
    return torch.arange(n).view(1, 1, n).expand(3, 1, n)


@torch.inference_mode()
def greedy_walk(model, steps: int, device) -> torch.Tensor:
    """A prompt of 8 text ids and ``steps`` codebook ids decoded greedily by ``model``: ``[1, 8 + steps]``."""
    ids = torch.arange(100, 108, device=device)[None]
    cache = model.new_cache(1, 8 + steps)
    logits = model(ids, positions(8).to(device), cache, 0, last_only=True)
    out = [ids]
    for i in range(steps):
        token = logits[:, -1, :16384].argmax(-1, keepdim=True)
        out.append(token)
        logits = model(token, positions(8 + i + 1)[..., -1:].to(device), cache, 8 + i)
    return torch.cat(out, dim=1)


@torch.inference_mode()
def walk_logits(model, walk: torch.Tensor) -> torch.Tensor:
    n = walk.shape[1]
    return model(walk, positions(n).to(walk.device), model.new_cache(1, n), 0)[0, 7:-1, :16384].float()


def dit_inputs(config, device, dtype, size: int):
    g = torch.Generator().manual_seed(5)
    h = w = size // 8
    return dict(latents=torch.randn(1, 16, h, w, generator=g).to(device, dtype),
                glyph=torch.randn(1, 7, config.text_embed_dim, generator=g).to(device, dtype),
                prior_ids=torch.randint(0, config.prior_vq_quantizer_codebook_size, (1, h * w // 4), generator=g)
                .to(device), prior_drop=False, timestep=torch.tensor([500.0], device=device),
                target_size=torch.tensor([[float(size)] * 2], device=device), crop=torch.zeros(1, 2, device=device))


@torch.inference_mode()
def component_output(name: str, model, reference_walk, device, size: int):
    if name == "ar":
        return walk_logits(model, reference_walk)
    if name == "dit":
        return model(**dit_inputs(model.config, device, model.dtype, size)).float()
    ids = torch.tensor([[3 + b for b in PROMPT.encode()] + [1]], device=device)
    return model(ids).float()


@torch.inference_mode()
def image(models: dict, tokenizer, vae, release: str, size: int) -> torch.Tensor:
    grid = generate_token_grid(models["ar"], tokenizer, PROMPT, size, size, ARSampling(seed=0), progress=False)
    glyph = glyph_conditioning(models["glyph"], PROMPT)
    settings = DecoderRun(steps=4, seed=0, shift_settings=release_shift_settings(release))
    latents = sample_latents(models["dit"], grid.upsampled(), glyph, size, size, settings, progress=False)
    return vae.decode(latents).float()


# ---- the run -------------------------------------------------------------------------------------------------------
def load(spec, path: str, dtype: str, device):
    gc.collect()
    with PeakRSS() as ram:
        start = time.perf_counter()
        model = components.load_component(spec, path, dtype, device)
        seconds = time.perf_counter() - start
    return model, {**ram.figures(), "load_s": seconds, "weights_mib": weight_bytes(model) / MIB}


def run(release: str, formats: list[str], device: torch.device, workdir: str, with_images: bool, size: int = 512,
        vae_dtype: str = "bf16") -> dict:
    compute = "bf16"
    reference, rows, measured = {}, [], {}
    load(glm_ar.SPEC, release, compute, device)  # warm-up: imports and one-time caches are not the weights
    for name, spec in COMPONENTS.items():
        model, figures = load(spec, release, compute, device)
        reference[name] = model
        rows.append({"component": name, "format": "bf16", "file_mib": None, **figures})
    walk = greedy_walk(reference["ar"], WALK, device)
    outputs = {name: component_output(name, m, walk, device, size) for name, m in reference.items()}
    # the floor: how far bf16 itself is from fp32 (on a random tiny model the top logits nearly tie)
    exact = walk_logits(components.load_component(glm_ar.SPEC, release, "fp32", device), walk)
    rows.append({"component": "ar", "format": "bf16 vs fp32", "file_mib": None, "weights_mib": None,
                 "peak_anon_mib": None, "peak_mapped_mib": None, "after_anon_mib": None, "load_s": None,
                 "relative_error": relative_error(outputs["ar"], exact), "logits_cosine": cosine(outputs["ar"], exact),
                 "logits_max_abs": (outputs["ar"] - exact).abs().max().item(),
                 "top1": (outputs["ar"].argmax(-1) == exact.argmax(-1)).float().mean().item()})
    tokenizer = load_text_tokenizer(release)
    vae = load_vae(release, vae_dtype, device)
    reference_image = image(reference, tokenizer, vae, release, size) if with_images else None

    for fmt in formats:
        models = {}
        for name, spec in COMPONENTS.items():
            if fmt == "fp8_at_load":
                path, dtype, file_mib = release, "fp8_e4m3fn", None
            else:
                path = os.path.join(workdir, f"{name}_{fmt}{conversion.extension(fmt)}")
                if not os.path.exists(path):
                    conversion.convert_component(spec, release, fmt, path)
                dtype, file_mib = compute, os.path.getsize(path) / MIB
            model, figures = load(spec, path, dtype, device)
            models[name] = model
            got, want = component_output(name, model, walk, device, size), outputs[name]
            row = {"component": name, "format": fmt, "file_mib": file_mib, **figures,
                   "relative_error": relative_error(got, want)}
            if name == "ar":
                row.update(logits_cosine=cosine(got, want), logits_max_abs=(got - want).abs().max().item(),
                           top1=(got.argmax(-1) == want.argmax(-1)).float().mean().item())
            rows.append(row)
            measured[name, fmt] = row
        if with_images:
            rows.append({"component": "e2e", "format": fmt,
                         "psnr_db": psnr(image(models, tokenizer, vae, release, size), reference_image)})
        del models
    return {"rows": rows, "measured": measured}


def fmt_value(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| component | format | weights MiB | file MiB | load: peak anon / mapped MiB | after MiB | load s | "
             "AR logits cos | AR max abs | AR top-1 | rel. error | e2e PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["component"] == "e2e":
            lines.append(f"| e2e image | {r['format']} | | | | | | | | | | {fmt_value(r['psnr_db'], '.2f')} |")
            continue
        lines.append(
            f"| {r['component']} | {r['format']} | {fmt_value(r['weights_mib'], '.2f')} | "
            f"{fmt_value(r['file_mib'], '.2f')} | {fmt_value(r['peak_anon_mib'], '.1f')} / "
            f"{fmt_value(r['peak_mapped_mib'], '.1f')} | {fmt_value(r['after_anon_mib'], '.1f')} | "
            f"{fmt_value(r['load_s'], '.2f')} | {fmt_value(r.get('logits_cosine'), '.6f')} | "
            f"{fmt_value(r.get('logits_max_abs'), '.4f')} | {fmt_value(r.get('top1'), '.3f')} | "
            f"{fmt_value(r.get('relative_error'), '.4f')} | |")
    return "\n".join(lines)


def full_size_table(sizes: dict[str, dict[str, int]]) -> str:
    fmts = ("source", "fp8_e4m3fn", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
    lines = ["| component (full size) | " + " | ".join("bf16" if f == "source" else f for f in fmts) + " |",
             "|---|" + "---|" * len(fmts)]
    for name, by in sizes.items():
        lines.append(f"| {name} | " + " | ".join(f"{by[f] / GB:.2f} GB" for f in fmts) + " |")
    both = sizes["GLM-Image AR"]["fp8_e4m3fn"] + sizes["GLM-Image DiT"]["fp8_e4m3fn"]
    lines.append(f"\nBoth GLM-Image models in FP8: {both / GB:.2f} GB of weights (with Glyph-ByT5 in FP8: "
                 f"{(both + sizes['Glyph-ByT5']['fp8_e4m3fn']) / GB:.2f} GB).")
    return "\n".join(lines)


def summary(measured: dict) -> str:
    ar = [r["logits_cosine"] for (name, _), r in measured.items() if name == "ar"]
    dit = [r["relative_error"] for (name, _), r in measured.items() if name == "dit"]
    return (f"formats: {len(measured)} checked, worst AR logits cosine {min(ar):.6f}, "
            f"worst DiT relative error {max(dit):.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tiny", action="store_true", help="the tiny random release, on the CPU")
    where.add_argument("--release", help="a GLM-Image release folder")
    where.add_argument("--bytes-per-token", action="store_true",
                       help="only the bytes read + written per AR token per format (dequant_bytes.py; counted, quick)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-images", action="store_true", help="skip the end-to-end images")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 32 (default 512)")
    parser.add_argument("--vae-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="the VAE's dtype for the end-to-end images (fp32: fast on CPUs without AVX512-BF16)")
    args = parser.parse_args(argv)
    if args.size < 64 or args.size % 32:
        parser.error(f"--size {args.size}: use a multiple of 32 of at least 64")
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if args.bytes_per_token:
        import dequant_bytes
        rows, text = dequant_bytes.table(FULL_SIZE["GLM-Image AR"][1])
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"bytes_per_token": rows, "torch": torch.__version__}, f, indent=2)
        return {"bytes_per_token": rows, "table": text}
    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        release = args.release
        if args.tiny:
            from glm_image_nodes.testing.tiny_release import write_tiny_release
            release = write_tiny_release(os.path.join(tmp, "tiny"))
        results = run(release, formats, device, tmp, with_images=not args.no_images, size=args.size,
                      vae_dtype=args.vae_dtype)
    sizes = full_size_bytes()
    report = {"meta": {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.machine(), "date": datetime.date.today().isoformat(),
                       "release": "tiny" if args.tiny else args.release, "formats": formats,
                       "size": args.size, "vae_dtype": args.vae_dtype},
              "rows": results["rows"], "full_size_bytes": sizes,
              "table": table(results["rows"]), "full_size_table": full_size_table(sizes),
              "summary": summary(results["measured"])}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(report["table"])
    print()
    print(report["full_size_table"])
    print()
    print(report["summary"])
    return report


if __name__ == "__main__":
    main()
