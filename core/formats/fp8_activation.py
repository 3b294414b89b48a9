"""The FP8 GEMM's activation quantization (amax, scale, cast) as one compiled region on CUDA.

Eagerly it is about six elementwise passes over the activations (abs, amax, divide, clamp, divide, cast), about
the cost of the FP8 GEMM itself at DiT sizes; ``torch.compile`` fuses them into a reduction and one cast
kernel. Under an outer ``torch.compile`` (the compiled AR step or DiT block) the plain function is traced
into that graph instead. If the compile fails (no C compiler for Triton, an old driver), the eager passes run
from then on, with one log line: the FP8 GEMM itself stays on.
"""
from __future__ import annotations

import logging

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
log = logging.getLogger("glm_image_nodes")


def quantize_activation(x2: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` -> (e4m3 ``[M, K]``, float32 scale ``[M, 1]`` per row or ``[1, 1]``) with x ~ q * scale."""
    x2 = x2.float()
    amax = x2.abs().amax(dim=-1, keepdim=True) if rowwise else x2.abs().amax().reshape(1, 1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x2 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FusedQuantize:
    def __init__(self, compile_on=lambda t: t.is_cuda):
        self.compile_on = compile_on
        self.compiled = None
        self.failed = False

    def __call__(self, x2: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compile_on(x2) or self.failed or torch.compiler.is_compiling():
            return quantize_activation(x2, rowwise)
        if self.compiled is None:
            self.compiled = torch.compile(quantize_activation, dynamic=True, fullgraph=True)
        try:
            return self.compiled(x2, rowwise)
        except torch.OutOfMemoryError:  # the activations' size, not the compile: the caller's OOM handling
            raise
        except Exception as error:  # a compile that cannot build: the eager passes give the same values
            self.failed = True
            log.warning("glm-image: the fused FP8 activation quantization could not be compiled (%s: %s); "
                        "quantizing eagerly. Fix: install a C compiler and the Python headers.",
                        type(error).__name__, (str(error).strip().splitlines() or [""])[0][:200])
            return quantize_activation(x2, rowwise)


fused_quantize = FusedQuantize()
