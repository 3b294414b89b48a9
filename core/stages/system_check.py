"""What this machine gives the pack, as a report a user can paste into a bug report.

Device and capability, torch / CUDA / cuDNN / Triton / driver versions, free VRAM and RAM, whether Triton can
build its launcher (a C compiler and ``Python.h``), which fused ops passed their self-check on the device (and
why not), FP8 GEMM and SageAttention / FlashAttention availability, and the SDPA kernels torch can run for the
DiT's and the AR's attention shapes (first = torch's pick). On a machine without CUDA the GPU parts are left
out. ``glm-image-check`` prints it; the ``GLM-Image System Check`` node shows it.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig

import torch

from ..cuda import self_check
from ..cuda.triton_support import HAVE_TRITON
from ..formats import fp8, fused_dequant  # noqa: F401  (fused_dequant registers its kernels' self-checks)
from ..runtime import attention, sdpa_backends

GIB = 2 ** 30
# attention shapes at 1024x1024: the DiT (CFG batch 2, 32 heads of 128, 4096 image + 128 glyph tokens) and the
# AR prefill (32 query / 2 KV heads of 128, a 1024-token prompt, causal)
DIT_SHAPE = dict(batch=2, heads=32, kv_heads=32, length=4096 + 128, causal=False)
AR_SHAPE = dict(batch=1, heads=32, kv_heads=2, length=1024, causal=True)


def _ram() -> dict:
    try:
        import psutil
        memory = psutil.virtual_memory()
        return {"ram_free_gib": memory.available / GIB, "ram_total_gib": memory.total / GIB}
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return {"ram_free_gib": info["MemAvailable"] / GIB, "ram_total_gib": info["MemTotal"] / GIB}
    except (OSError, KeyError, ValueError):
        return {"ram_free_gib": None, "ram_total_gib": None}


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _launcher_build() -> dict:
    """What Triton needs to build its launcher at the first launch (triton/runtime/build.py: CC, gcc, clang)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return {"c_compiler": compiler, "python_h": os.path.exists(header)}


def _sdpa_choice(device: torch.device, dtype: torch.dtype, shape: dict) -> list[str] | str:
    b, h, hkv, n = shape["batch"], shape["heads"], shape["kv_heads"], shape["length"]
    try:
        q = torch.randn(b, h, n, 128, device=device, dtype=dtype)
        k = torch.randn(b, hkv, n, 128, device=device, dtype=dtype)
        return sdpa_backends.runnable(q, k, k, is_causal=shape["causal"], enable_gqa=h != hkv)
    except torch.OutOfMemoryError:
        return "not measured (out of memory)"


def report(device: torch.device | str | None = None) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device(device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the key the model's calls use
    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": None, "device": str(device), **_ram(), **_launcher_build(),
           "sage_installed": attention.installed("sage"), "flash_installed": attention.installed("flash")}
    if HAVE_TRITON:
        import triton
        out["triton"] = triton.__version__
    if device.type != "cuda":
        return out
    free, total = torch.cuda.mem_get_info(device)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    out.update({"gpu": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": _driver(),
                "vram_free_gib": free / GIB, "vram_total_gib": total / GIB, "compute_dtype": str(dtype)})
    ops = [op for op in sorted(self_check.CHECKS) if op != "scaled_mm"]
    if HAVE_TRITON:
        mine = (str(device), str(dtype).removeprefix("torch."))
        out["fused_ops"] = {v.op: v.cause or "passed" for v in self_check.check_all(device, dtype, ops)
                            if v.op in ops and (v.device, v.dtype) == mine}
    else:
        out["fused_ops"] = "Triton is not installed: the torch references run"
    has_fp8 = fp8.has_fp8_matmul(device)
    out["fp8_gemm"] = ("no FP8 matrix math on this GPU (needs compute capability 8.9+): FP8 weights are "
                       "dequantized per layer") if not has_fp8 else (
        "passed" if self_check.passed("scaled_mm", device, torch.bfloat16)
        else next(v.cause for v in self_check.verdicts()
                  if (v.op, v.device, v.dtype) == ("scaled_mm", str(device), "bfloat16")))
    out["sdpa_dit"] = _sdpa_choice(device, dtype, DIT_SHAPE)
    out["sdpa_ar_prefill"] = _sdpa_choice(device, dtype, AR_SHAPE)
    out["cudnn_first_by_torch"] = sdpa_backends.torch_prefers_cudnn(out["capability"], out["cudnn"])
    return out


LABELS = {"python": "Python", "platform": "Platform", "torch": "torch", "cuda": "CUDA (torch build)",
          "cudnn": "cuDNN", "triton": "Triton", "driver": "NVIDIA driver", "device": "Compute device", "gpu": "GPU",
          "capability": "Compute capability", "vram_free_gib": "VRAM free (GiB)", "vram_total_gib": "VRAM total (GiB)",
          "ram_free_gib": "RAM free (GiB)", "ram_total_gib": "RAM total (GiB)",
          "c_compiler": "C compiler (Triton's launcher)", "python_h": "Python.h (Triton's launcher)",
          "compute_dtype": "Compute dtype", "fused_ops": "Fused ops self-check", "fp8_gemm": "FP8 GEMM (_scaled_mm)",
          "sage_installed": "SageAttention installed", "flash_installed": "FlashAttention installed",
          "sdpa_dit": "SDPA kernels for the DiT (torch's pick first)",
          "sdpa_ar_prefill": "SDPA kernels for the AR prefill (torch's pick first)",
          "cudnn_first_by_torch": "torch puts cuDNN attention first"}


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return "not found" if value is None else str(value)


def format_report(info: dict) -> str:
    lines = ["GLM-Image system check"]
    for key, label in LABELS.items():
        if key not in info:
            continue
        value = info[key]
        if isinstance(value, dict):
            lines.append(f"{label}:")
            lines += [f"  {op}: {verdict}" for op, verdict in value.items()]
        else:
            lines.append(f"{label}: {_value(value)}")
    if "gpu" not in info:
        lines.append("No CUDA device: the GPU parts (fused kernels, FP8 GEMM, SDPA kernels) are not checked.")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="glm-image-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to check (default: cuda when available, else cpu)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"--device {args.device!r} is not a torch device ({e}); give e.g. cuda, cuda:1 or cpu.")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist; create it or give another path.")
    info = report(args.device)
    print(format_report(info))
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
