"""The user's Stop: ComfyUI's interrupt inside ComfyUI; outside, ``request_interrupt`` (the headless executor's)."""
from __future__ import annotations

from contextlib import contextmanager

try:  # pragma: no cover - exercised only inside ComfyUI
    import comfy.model_management as _mm
except Exception:  # ImportError, or a partial ComfyUI tree
    _mm = None


class Interrupted(RuntimeError):
    """Raised outside ComfyUI when ``request_interrupt`` was called (ComfyUI raises its own)."""


_interrupt_requested = False


def request_interrupt() -> None:
    """Outside ComfyUI: make the running AR or decoder loop stop at its next step."""
    global _interrupt_requested
    _interrupt_requested = True


def clear_interrupt() -> None:
    """Forget an interrupt requested while nothing ran, so it cannot abort the next run."""
    global _interrupt_requested
    _interrupt_requested = False


_runs_in_progress = 0


@contextmanager
def run_scope():
    """One run (a workflow, or a node called on its own): entering the outermost scope forgets an interrupt
    requested while nothing ran, as ComfyUI clears its flag when a prompt starts (``execution.py``); inside it,
    a request stops the run."""
    global _runs_in_progress
    if _runs_in_progress == 0:
        clear_interrupt()
    _runs_in_progress += 1
    try:
        yield
    finally:
        _runs_in_progress -= 1


def check_interrupt() -> None:
    global _interrupt_requested
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("interrupted by the user")
