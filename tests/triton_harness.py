"""Running the pack's Triton kernels without a GPU: the interpreter on CPU tensors, and sm_90a compiles.

``interpreted(monkeypatch)`` swaps every ``@triton.jit`` function of the kernel modules and of
``triton.language`` (``tl.sum``, ``tl.max``...) for its ``InterpretedFunction``, which is what
``TRITON_INTERPRET=1`` does at import time, for the duration of one test. ``recorded_launches`` runs a launcher on
meta tensors and records each kernel launch, from
which ``compile_sm90`` builds the kernel for Hopper with the bundled ptxas, and ``ptxas_report`` reads the
register and spill counts ptxas prints.
"""
import os
import re
import subprocess
import tempfile

import torch

triton = __import__("pytest").importorskip("triton")
from glm_image_nodes.core.cuda import activations, adaln, decode_attention, dequant, norms, rope, triton_support  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNEL_MODULES = (activations, adaln, decode_attention, dequant, norms, rope, triton_support)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32",
         torch.bool: "i1"}


def interpreted(monkeypatch):
    import triton.experimental.gluon  # noqa: F401  (imported lazily by the launcher; it wants real JITFunctions)
    import triton.language as tl
    import triton.language.standard as standard
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    # The interpreter patches triton.language's builtins while a kernel runs and, for nested device functions
    # such as tl.sum, leaves some patched: put every attribute back afterwards, or later compiles break.
    for namespace in (tl, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base):
        for name, value in list(vars(namespace).items()):
            if not name.startswith("__"):
                monkeypatch.setattr(namespace, name, value)
    for module in KERNEL_MODULES + (tl, standard):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                monkeypatch.setattr(module, name, InterpretedFunction(value.fn))


class Launch:
    def __init__(self, kernel, grid, args, kwargs):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs


class _Recorder:
    def __init__(self, kernel, store):
        self.kernel, self.store = kernel, store

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.store.append(Launch(self.kernel, grid, args, kwargs))


def recorded_launches(monkeypatch, module, launch, *args):
    """The kernel launches ``launch(*args)`` makes (nothing runs: arguments may be meta tensors)."""
    store = []
    for name, value in list(vars(module).items()):
        if isinstance(value, JITFunction) and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, _Recorder(value, store))
    launch(*args)
    monkeypatch.undo()
    return store


def compile_sm90(launch: Launch):
    fn = launch.kernel
    options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in launch.kwargs.items() if k not in options}
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
        else:
            signature[name] = "fp32"
    for name in constexprs:
        signature[name] = "constexpr"
    for param in fn.params:  # constexprs declared inside the kernel body are not arguments
        if param.is_constexpr and param.name not in signature:
            raise AssertionError(f"{fn.__name__}: constexpr {param.name} was not given at launch")
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    assert spills and registers, text
    return {"spill_bytes": sum(spills), "registers": max(registers), "log": text}
