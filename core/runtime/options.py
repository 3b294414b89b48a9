"""How a run executes, passed with the call: attention kernel, kernel mode, regional compile.

A ``RunOptions`` travels from the node (or script) into the stage and the model's ``forward``, down to the
attention entry point (``attention.attention(..., options=)``) and the fused-kernel dispatch (``mode=``), the
way ComfyUI passes ``transformer_options``. Nothing is switched in a module global, so two samplers running in
two threads with different options each get their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..cuda import dispatch
from .attention import check_backend


@dataclass(frozen=True)
class RunOptions:
    """``attention``: one of ``attention.BACKENDS`` (auto/sdpa: PyTorch SDPA; sage, flash when installed).
    ``kernels``: the fused-kernel mode (``dispatch.MODES``); by default ``GLMIMAGE_KERNELS`` as it is when the
    options are built. ``compile``: run the DiT blocks through the regional ``torch.compile``."""
    attention: str = "auto"
    kernels: str = field(default_factory=dispatch.default_mode)
    compile: bool = False

    def __post_init__(self):
        check_backend(self.attention)
        dispatch.check_mode(self.kernels)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}.")


def resolved(options: RunOptions | None) -> RunOptions:
    """``options``, or the defaults (built now, so ``GLMIMAGE_KERNELS`` is read now)."""
    return options if options is not None else RunOptions()
