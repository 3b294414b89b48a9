"""AR service throughput: N concurrent clients of ``glm-image-serve`` (real Ray Serve, local cluster) against N
sequential local runs of the pack's AR sampler, measured in the same run, N = 1, 2, 4, 8.

The model: the release's AR layer structure (``--layers`` of its 40; 32 query / 2 KV heads of 128, partial
M-RoPE, sandwich norms, the 16512-id head, the 168064-id vocabulary) at a narrow width (``--width``), random
weights, fp32, written as a release folder (with the tiny tokenizer) that the service loads like a real one.
Every request is a text-to-image grid (``--size``: target + preview tokens), temperature 0.9 / top-p 0.75, its
own seed; the local runs use the same seeds, one torch thread like the service's replica. Tokens/s counts
every generated token. The batch sizes the service formed come from its ``/health``. Ray's start-up time
(``ray.init`` + Serve + the replica loading the model) and the RSS of Ray's processes and of the replica after
start-up are printed too.

    python benchmarks/ar_service.py                                      # the table of docs/performance.md
    python benchmarks/ar_service.py --layers 2 --width 64 --clients 1 2 --size 128   # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tests")) if p not in sys.path]
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")

import torch  # noqa: E402
from glm_image_nodes.core.models.glm_ar import HEAD, PREFIX, ARConfig, GlmImageAR, load_ar_model  # noqa: E402
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer  # noqa: E402
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid  # noqa: E402
from glm_image_nodes.core.stages.remote_ar import generate_token_grid_remote  # noqa: E402
from glm_image_nodes.core.stages.settings import ARSampling  # noqa: E402
from glm_image_nodes.testing.tiny_release import write_tiny_release  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FULL_CONFIG = os.path.join(ROOT, "benchmarks", "configs", "full", "vision_language_encoder", "config.json")
PROMPT = 'a neon sign that says "GLM-Image" above a wet street at night, cinematic light'


def write_narrow_release(folder: str, width: int, layers: int) -> str:
    """The tiny release (tokenizer, other components) with the AR replaced by the release's structure at ``width``."""
    write_tiny_release(folder)
    with open(FULL_CONFIG, encoding="utf-8") as f:
        full = json.load(f)
    # head_dim: the release derives 128 from 4096 / 32; at a narrow width it must be given
    text = dict(full["text_config"], hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
                head_dim=128)
    ar_folder = os.path.join(folder, "vision_language_encoder")
    with open(os.path.join(ar_folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["text_config"] = text
    with open(os.path.join(ar_folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    generator = torch.Generator().manual_seed(0)
    model = GlmImageAR(ARConfig.from_text_config(text))
    state = {}
    for name, tensor in model.state_dict().items():
        scale = (1 / tensor[0].numel() ** 0.5) if tensor.ndim >= 2 else 0.02
        value = torch.randn(tensor.shape, generator=generator) * scale + (1 if "norm" in name else 0)
        state[name if name.startswith(HEAD) else PREFIX + name] = value.contiguous()
    for file in os.listdir(ar_folder):
        if file.endswith(".safetensors"):
            os.remove(os.path.join(ar_folder, file))
    save_file(state, os.path.join(ar_folder, "model.safetensors"))
    return folder


def ray_rss_mb() -> tuple[float, float]:
    """RSS (MB) of Ray's own processes (GCS, raylet, agents, Serve controller and proxy) and of the replicas."""
    import psutil
    system = replicas = 0
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid == os.getpid() or "ray" not in cmdline.lower():
            continue
        if "ServeReplica" in cmdline:
            replicas += process.info["memory_info"].rss
        else:
            system += process.info["memory_info"].rss
    return system / 2 ** 20, replicas / 2 ** 20


def concurrent_clients(url, tokenizer, size, seeds) -> float:
    errors = []

    def one(seed):
        try:
            generate_token_grid_remote(url, tokenizer, PROMPT, size, size, ARSampling(seed=seed), timeout=3600)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def sequential_local(model, tokenizer, size, seeds) -> float:
    started = time.perf_counter()
    for seed in seeds:
        generate_token_grid(model, tokenizer, PROMPT, size, size, ARSampling(seed=seed), progress=False)
    return time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="output side in pixels (grid + preview tokens)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    import ray
    from glm_image_nodes.serving.cli import start
    from glm_image_nodes.serving.settings import ServeSettings
    from ray_service import free_port, health

    torch.set_num_threads(1)
    folder = write_narrow_release(tempfile.mkdtemp(prefix="glm_ar_service_"), args.width, args.layers)
    tokenizer = load_text_tokenizer(folder)
    model = load_ar_model(folder, dtype="fp32", device="cpu")
    tokens = generate_token_grid(model, tokenizer, PROMPT, args.size, args.size, ARSampling(seed=0), progress=False)
    per_request = tokens.ids[0].numel() + tokens.preview[0].numel()

    port = free_port()
    started = time.perf_counter()
    start(ServeSettings(folder, max_batch=max(args.clients), batch_wait_ms=args.batch_wait_ms,
                        max_queue=4 * max(args.clients), dtype="fp32", threads=1), "127.0.0.1", port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    health(url)
    startup = time.perf_counter() - started
    system_mb, replica_mb = ray_rss_mb()
    generate_token_grid_remote(url, tokenizer, PROMPT, args.size, args.size, ARSampling(seed=0))  # warm-up

    rows = []
    for n in args.clients:
        seeds = list(range(1, n + 1))
        local_s = sequential_local(model, tokenizer, args.size, seeds)
        before = len(health(url)["batch_sizes"])
        service_s = concurrent_clients(url, tokenizer, args.size, seeds)
        formed = health(url)["batch_sizes"][before:]
        rows.append((n, n / local_s, n / service_s, formed))
    from ray import serve
    serve.shutdown()
    ray.shutdown()

    print(f"# AR service throughput, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, ray {ray.__version__}, 1 torch thread per side")
    print(f"# model: release AR structure, {args.layers} layers at width {args.width}, fp32; {args.size}x{args.size} "
          f"text-to-image = {per_request} tokens per request")
    print(f"# Ray local cluster (num_cpus=2, no dashboard) + Serve + replica ready in {startup:.1f} s; RSS: Ray's "
          f"processes {system_mb:.0f} MB, the replica (with the model) {replica_mb:.0f} MB")
    print("| clients | sequential local req/s | service req/s | sequential tok/s | service tok/s | speed-up | "
          "batches formed |")
    print("|---|---|---|---|---|---|---|")
    for n, local_rps, service_rps, formed in rows:
        print(f"| {n} | {local_rps:.3f} | {service_rps:.3f} | {local_rps * per_request:.0f} | "
              f"{service_rps * per_request:.0f} | {service_rps / local_rps:.2f}x | {formed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
