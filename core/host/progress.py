"""Progress bars and live previews: ComfyUI's bar (and its websocket previews, ``--preview-method``,
``--preview-size``) inside ComfyUI; tqdm and previews saved to a folder outside."""
from __future__ import annotations

import os

from .interrupts import check_interrupt

try:  # pragma: no cover - exercised only inside ComfyUI
    import comfy.utils as _comfy_utils
except Exception:  # ImportError, or a partial ComfyUI tree
    _comfy_utils = None
try:  # pragma: no cover - exercised only inside ComfyUI
    from comfy.cli_args import args as _comfy_args
except Exception:
    _comfy_args = None


PREVIEW_FORMAT = "JPEG"       # what ComfyUI's own latent previewers send
DEFAULT_PREVIEW_SIZE = 512    # ComfyUI's --preview-size default
_preview_folder: str | None = None


def save_previews_to(folder: str | None) -> None:
    """Outside ComfyUI: write every live preview as a PNG into ``folder`` (None: stop)."""
    global _preview_folder
    if folder:
        os.makedirs(folder, exist_ok=True)
    _preview_folder = folder or None


def preview_method() -> str:
    """ComfyUI's ``--preview-method`` (``none``, ``auto``, ``latent2rgb`` or ``taesd``); outside ComfyUI
    ``latent2rgb`` once ``save_previews_to`` named a folder, else ``none``."""
    if _comfy_args is not None:
        method = _comfy_args.preview_method
        return str(getattr(method, "value", method))
    return "latent2rgb" if _preview_folder else "none"


def preview_size() -> int:
    """The longest side previews are shown at (ComfyUI's ``--preview-size``)."""
    return int(getattr(_comfy_args, "preview_size", DEFAULT_PREVIEW_SIZE) or DEFAULT_PREVIEW_SIZE)


class Progress:
    """Progress for a loop of ``total`` steps: ComfyUI's bar inside ComfyUI, tqdm outside.

    ``update`` also checks for an interrupt, so a loop that reports progress every step can be stopped.
    ``update(preview=image)`` sends a PIL image the way ComfyUI's latent previewers do (a JPEG frame on the
    websocket, shown on the node); outside ComfyUI it is saved to the ``save_previews_to`` folder, if any.
    """

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total = total
        self.desc = desc
        self.done = 0
        self._bar = None
        self._tqdm = None
        if _comfy_utils is not None:
            self._bar = _comfy_utils.ProgressBar(total)
        elif enabled and os.environ.get("GLMIMAGE_NO_PROGRESS") != "1":
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, n: int = 1, preview=None) -> None:
        check_interrupt()
        self.done += n
        if self._bar is not None:
            frame = None if preview is None else (PREVIEW_FORMAT, preview, preview_size())
            self._bar.update_absolute(self._bar.current + n, self.total, frame)
        if self._tqdm is not None:
            self._tqdm.update(n)
        if preview is not None and _preview_folder:
            name = "".join(c if c.isalnum() else "_" for c in self.desc.lower()) or "preview"
            preview.save(os.path.join(_preview_folder, f"{name}_{self.done:04d}.png"))

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
