"""The one GPU run: at most 7 minutes on one H100/H200, results written after every stage.

    python benchmarks/gpu_run.py --out out            # on the GPU machine (OUT=... also works)
    python benchmarks/gpu_run.py --tiny --out out     # the same stages on the CPU with tiny sizes (CI, < 3 min)

Stages, in order (each a subprocess with its own timeout, never past the run's budget; ``$OUT/gpu_run.json`` and
``$OUT/performance_gpu.md`` are rewritten after each one, so a stage that times out loses only itself):
0. install: the wheels carried in ``.whl/`` (the lent image has torch 2.11 and Triton 3.6, no network; the
   reference needs transformers 5.23.0 and diffusers 0.42.1, the pack gguf 0.19.0; benchmarks/README.md);
1. system: ``glm-image-check`` (device, versions, memory, every fused op's self-check, FP8 GEMM, SDPA kernels);
2. kernel tests: the interpreter/sm_90a tests and the GPU kernel tests (tests/test_cuda_gpu.py);
3. defaults at 1024x1024, what a user runs (eager decode, no compile), the pack and the reference in the same
   run: AR tokens/s, DiT s/step with CFG, VAE, end to end, peak VRAM per stage (bench_glm_image.py);
4. if time is left: the AR decode captured as a CUDA graph (pack only);
5. if time is left: the DiT with the regional compile of its block (pack only).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = [sys.executable, "benchmarks/bench_glm_image.py"]


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]
    timeout_s: int
    optional: bool = False    # run only if its whole timeout fits the time left
    result: str | None = None  # the JSON file the stage writes, merged into gpu_run.json


def stages(tiny: bool, out: str) -> list[Stage]:
    kernel_tests = ["tests/test_cuda_kernels.py", "tests/test_self_check.py", "tests/test_kernel_offsets.py"]
    if tiny:
        size = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--ar-tokens", "4", "--prompt-tokens", "16",
                "--vae-repeats", "1"]
        defaults = size + ["--ar-batch", "1", "--stages", "ar,decoder,vae,e2e"]
        times = dict(system=60, kernels=90, defaults=120, graph=40, compiled=120)
        kernel_tests = ["tests/test_self_check.py", "tests/test_kernel_offsets.py"]
    else:
        size = ["--sizes", "1024x1024", "--ar-tokens", "64", "--decoder-steps-timed", "3", "--vae-repeats", "1"]
        defaults = size + ["--ar-batch", "1", "--reference-ar", "static", "--stages", "ar,decoder,vae,e2e"]
        times = dict(system=45, kernels=100, defaults=210, graph=60, compiled=100)
        kernel_tests = kernel_tests + ["tests/test_cuda_gpu.py"]
    j = lambda name: os.path.join(out, name)  # noqa: E731
    return [
        Stage("system", [sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                         "from standalone import register_pack; register_pack(); "
                         "from glm_image_nodes.core.stages.system_check import main; "
                         f"sys.exit(main(['--json', {j('system.json')!r}]))"], times["system"],
              result=j("system.json")),
        Stage("kernel_tests", [sys.executable, "-m", "pytest", "-q", *kernel_tests], times["kernels"]),
        Stage("defaults_1024", BENCH + defaults + ["--pack-decode-steps", "eager", "--out", j("defaults.json")],
              times["defaults"], result=j("defaults.json")),
        Stage("cuda_graph_decode", BENCH + size + ["--ar-batch", "1", "--stages", "ar", "--skip-reference",
                                                   "--pack-decode-steps", "cuda graph", "--out", j("graph.json")],
              times["graph"], optional=True, result=j("graph.json")),
        Stage("compiled_dit_block", BENCH + size + ["--stages", "decoder", "--skip-reference",
                                                    "--pack-compile-blocks", "--out", j("compiled.json")],
              times["compiled"], optional=True, result=j("compiled.json")),
    ]


def install(out: str) -> dict:
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        return {"status": "skipped", "why": "no wheels in .whl/"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels], capture_output=True,
                          text=True, timeout=90)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in ("/tmp/site", os.environ.get("PYTHONPATH")) if p)
    return {"status": "passed" if done.returncode == 0 else "failed", "seconds": time.perf_counter() - start,
            "wheels": [os.path.basename(w) for w in wheels], "log_tail": (done.stdout + done.stderr)[-2000:]}


def run_stage(stage: Stage, timeout: float, out: str) -> dict:
    start = time.perf_counter()
    log_path = os.path.join(out, f"{stage.name}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(stage.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
            status = "passed" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    entry = {"status": status, "seconds": round(time.perf_counter() - start, 1), "log": log_path}
    if stage.result and os.path.exists(stage.result):
        with open(stage.result, encoding="utf-8") as f:
            data = json.load(f)
        entry["result"] = {k: data[k] for k in ("meta", "table", "ratios_pack_over_reference") if k in data} or data
    return entry


def markdown(report: dict) -> str:
    lines = [f"## GPU run (benchmarks/gpu_run.py{' --tiny' if report['tiny'] else ''}), {report['date']}", ""]
    system = report["stages"].get("system", {}).get("result", {})
    if system:
        lines.append(f"- device {system.get('gpu', system.get('device'))}, capability {system.get('capability')}, "
                     f"torch {system.get('torch')}, Triton {system.get('triton')}, CUDA {system.get('cuda')}, "
                     f"cuDNN {system.get('cudnn')}, driver {system.get('driver')}")
    for name, entry in report["stages"].items():
        lines.append(f"- {name}: {entry['status']} ({entry.get('seconds', 0)} s)")
    for name, entry in report["stages"].items():
        table = entry.get("result", {}).get("table") if isinstance(entry.get("result"), dict) else None
        if table:
            lines += ["", f"### {name}", ""] + (table if isinstance(table, list) else [str(table)])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: the CI run of this script")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (420; tiny 170)")
    args = parser.parse_args(argv)
    budget = args.budget or (170 if args.tiny else 420)
    args.out = os.path.abspath(args.out)  # the stages run in the repository root and write their results here
    os.makedirs(args.out, exist_ok=True)
    os.environ["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    report = {"tiny": args.tiny, "budget_s": budget, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "stages": {}}

    def save():
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        with open(os.path.join(args.out, "gpu_run.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        with open(os.path.join(args.out, "performance_gpu.md"), "w", encoding="utf-8") as f:
            f.write(markdown(report))

    if not args.tiny:
        report["stages"]["install"] = install(args.out)
        save()
    failed = False
    for stage in stages(args.tiny, args.out):
        left = budget - (time.perf_counter() - start)
        if (stage.optional and left < stage.timeout_s) or left < 10:
            report["stages"][stage.name] = {"status": f"skipped: {left:.0f} s left of the budget"}
        else:
            entry = run_stage(stage, min(stage.timeout_s, left), args.out)
            report["stages"][stage.name] = entry
            failed |= not stage.optional and entry["status"] != "passed"
        save()
        print(f"{stage.name}: {report['stages'][stage.name]['status']}", flush=True)
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
