"""First-use self-checks of the fused paths, with the torch reference as the fallback.

A fused op (a Triton kernel, FP8 ``_scaled_mm``) can fail on a user's machine in ways no CPU test sees: Triton
builds its launcher with the system C compiler and ``Python.h`` at the first launch, a Triton/driver pair may
not load, a PTX may not assemble, a kernel may compute wrong values on an untested GPU. So the first time an
op is about to run on a device and dtype, it runs once on a small input against its torch reference; any
exception (but running out of memory, which propagates and leaves no verdict), non-finite value, wrong shape or
error beyond the op's stated tolerance marks it failed for the rest of the process, the caller uses the
reference, and one warning line names the op, the cause and the fix.

Ops register their sample inputs here (``register``); ``passed`` is what the dispatch asks. The verdict is a
plain Python bool computed eagerly (``torch.compiler`` sees a constant: ``assume_constant_result``).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("glm_image_nodes")

FP32_TOLERANCE = 1e-4  # max |fused - reference| relative to max(1, max |reference|)
BF16_TOLERANCE = 2 ** -6  # two bf16 ulps at the largest value
BUILD_FIX = ("install a C compiler and the Python headers (e.g. `apt install build-essential python3-dev`, or set CC),"
             " or install the Triton version your torch was built with (`pip install -U torch`)")
MISMATCH_FIX = "please report it with the output of `glm-image-check`"
SILENCE = "GLMIMAGE_KERNELS=reference skips the fused paths"


@dataclass(frozen=True)
class Check:
    """``fused`` and ``reference`` take the arguments ``sample(device, dtype)`` returns (a fresh set per call:
    ops may write into their inputs; ``mutated`` indexes the arguments compared after the call too).
    ``tolerance(dtype)`` bounds the max abs error relative to max(1, max |reference|), or, with ``relative``,
    the error norm relative to the reference's norm. ``off_switch``: how a user skips this fused path (said
    in the warning)."""
    fused: Callable
    reference: Callable
    sample: Callable[[torch.device, torch.dtype], tuple]
    tolerance: Callable[[torch.dtype], float]
    mutated: tuple[int, ...] = ()
    relative: bool = False
    off_switch: str = SILENCE


@dataclass(frozen=True)
class Verdict:
    op: str
    device: str
    dtype: str
    ok: bool
    cause: str = ""


def kernel_tolerance(dtype: torch.dtype) -> float:
    return FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE


CHECKS: dict[str, Check] = {}
_verdicts: dict[tuple[str, torch.device, torch.dtype], Verdict] = {}
_checking = threading.RLock()  # two samplers in two threads run (and warn about) each check once


def register(op: str, check: Check) -> None:
    CHECKS[op] = check


def _outputs(result, args, mutated) -> list[torch.Tensor]:
    out = list(result) if isinstance(result, (tuple, list)) else [result]
    return out + [args[i] for i in mutated]


def _error(got: torch.Tensor, want: torch.Tensor, relative: bool) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    diff = (got.float() - want.float())
    if relative:
        return (diff.norm() / want.float().norm().clamp_min(1e-30)).item()
    return (diff.abs().max() / want.float().abs().max().clamp_min(1.0)).item()


def _run(check: Check, device: torch.device, dtype: torch.dtype) -> str:
    """'' when the fused op matches its reference on the sample, else the cause."""
    args = check.sample(device, dtype)
    try:
        got = _outputs(check.fused(*args), args, check.mutated)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:  # a full device says nothing of the kernel: no verdict, the caller's OOM
        raise
    except Exception as error:  # any failure to build, load or launch: the reference takes over
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return f"{type(error).__name__}: {first_line}"
    ref_args = check.sample(device, dtype)
    want = _outputs(check.reference(*ref_args), ref_args, check.mutated)
    limit = check.tolerance(dtype)
    if len(got) != len(want):
        return f"output count {len(got)} differs from the reference's {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:  # a wrong result like any other: the reference takes over
            return f"output {i} has shape {tuple(g.shape)}, the reference {tuple(w.shape)}"
        err = _error(g, w, check.relative)
        if not err <= limit:
            return f"output {i} differs from the reference by {err:.3g} (tolerance {limit:.3g})"
    return ""


@torch._dynamo.assume_constant_result
def passed(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fused ``op`` may run on ``device``/``dtype`` (a constant under ``torch.compile``). Runs the check
    on first use; warns once when it fails."""
    key = (op, device, dtype)
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict.ok
    with _checking:
        verdict = _verdicts.get(key)
        if verdict is None:
            check = CHECKS[op]
            with torch.no_grad():
                cause = _run(check, device, dtype)
            verdict = _verdicts[key] = Verdict(op, str(device), str(dtype).removeprefix("torch."), not cause, cause)
            if cause:
                fix = MISMATCH_FIX if cause.startswith("output") else BUILD_FIX
                log.warning("glm-image: fused %s on %s/%s failed its self-check (%s); using the torch reference "
                            "from now on. Fix: %s (%s).", op, device, verdict.dtype, cause, fix, check.off_switch)
    return verdict.ok


def check_all(device: torch.device, dtype: torch.dtype, ops=None) -> list[Verdict]:
    """Run (or recall) the checks of ``ops`` (default: every registered op) on ``device``/``dtype``."""
    for op in ops or sorted(CHECKS):
        passed(op, torch.device(device), dtype)
    return verdicts()


def verdicts() -> list[Verdict]:
    return list(_verdicts.values())


def forget() -> None:
    """Drop every verdict (tests; a new process starts empty)."""
    with _checking:
        _verdicts.clear()
