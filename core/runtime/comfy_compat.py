"""The one place that touches ComfyUI. Everything here works without ComfyUI too.

Inside ComfyUI: devices from ``comfy.model_management``, progress and live previews through
``comfy.utils.ProgressBar`` (which also raises on the user's interrupt), ``--preview-method`` from its command
line, model folders from ``folder_paths``.
Outside: the best local device, a tqdm bar, previews written to a folder when asked, and plain paths.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

log = logging.getLogger("glm_image_nodes")

try:  # pragma: no cover - exercised only inside ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
    IN_COMFYUI = True
except Exception:  # ImportError, or a partial ComfyUI tree
    _mm = _comfy_utils = _folder_paths = None
    IN_COMFYUI = False
try:  # pragma: no cover - exercised only inside ComfyUI
    from comfy.cli_args import args as _comfy_args
except Exception:
    _comfy_args = None


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


def get_device() -> torch.device:
    if _mm is not None:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    if _mm is not None:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def soft_empty_cache() -> None:
    if _mm is not None:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory(device: torch.device, need: int = 0) -> int | None:
    """Bytes free for new tensors on ``device`` (None when unknown). Inside ComfyUI its memory manager first
    unloads other models to make room for ``need`` bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        if _mm is not None and need:
            _mm.free_memory(need, device)
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    return None


class OutOfMemory(torch.OutOfMemoryError):
    """Out of device memory, with the stage that ran out and what to lower. A ``torch.OutOfMemoryError``, so
    ComfyUI's own recovery (unloading its models) still runs."""


def _weight_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def _module(item) -> torch.nn.Module:
    """A handle's weights (``handle.module``) or a bare module."""
    return item.module if hasattr(item, "module") else item


MANAGED_PREFIX = "net."  # where the pack's model sits in the ModelPatcher's container: its keys in patches


class _Managed(torch.nn.Module):
    """What ComfyUI's ModelPatcher holds: the pack's model as ``net`` (the patcher sets attributes such as
    ``device`` on the object it manages, which the pack's models keep as properties)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net


_managed_classes: dict[str, type] = {}


def _managed(net: torch.nn.Module) -> _Managed:
    """A ``_Managed`` subclass named after the model, so ComfyUI's log says "Requested to load GlmImageDiT"."""
    name = type(net).__name__
    if name not in _managed_classes:
        _managed_classes[name] = type(name, (_Managed,), {"__doc__": _Managed.__doc__})
    return _managed_classes[name](net)


_told: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        log.info(message)


def model_patcher(item):
    """The ComfyUI ``ModelPatcher`` of a handle, made on first use and kept on the handle, so ComfyUI's
    ``load_models_gpu`` keeps the model resident between runs, evicts it for other models, or loads it
    partially (the rest streamed per layer)."""
    from .comfy_patcher import PackModelPatcher
    from .lora_patches import comfy_lora_patcher
    from .residency import streamable

    patcher = getattr(item, "patcher", None)
    if patcher is None:
        if getattr(item, "loras", ()):  # a LoRA handle: a clone of its base's patcher with the LoRA patches
            patcher = comfy_lora_patcher(model_patcher(item.base), item.loras, prefix=MANAGED_PREFIX)
        else:
            patcher = PackModelPatcher(_managed(streamable(_module(item))), load_device=get_device(),
                                       offload_device=offload_device())
        item.patcher = patcher
    return patcher


@contextmanager
def _comfy_placement(items, device: torch.device, memory_required: int):
    from contextlib import ExitStack

    from .residency import EXECUTION_DEVICE, resident

    for item in items:
        if getattr(item, "block_swap", 0):
            _say_once("block_swap", "block_swap is not used inside ComfyUI: its memory manager keeps what fits "
                                    "on the GPU and streams the rest layer by layer (partial loading).")
    handles = [item for item in items if hasattr(item, "patcher")]
    _mm.load_models_gpu([model_patcher(item) for item in handles], memory_required=memory_required)
    with ExitStack() as stack:
        for item in items:
            module = _module(item)
            if item in handles:
                module.__dict__[EXECUTION_DEVICE] = device
                stack.callback(module.__dict__.pop, EXECUTION_DEVICE, None)
            else:  # a bare module (scripts, tests): swapped in for the stage as outside ComfyUI
                stack.enter_context(resident(module, device))
        yield device


@contextmanager
def _swap_placement(items, device: torch.device):
    from contextlib import ExitStack

    from .lora_patches import installed
    from .residency import resident, resolve_blocks

    with ExitStack() as stack:
        for item in items:
            module = _module(item)
            blocks = resolve_blocks(module, getattr(item, "blocks", None), getattr(item, "block_swap", 0))
            stack.enter_context(resident(module, device, blocks))
            stack.enter_context(installed(module, getattr(item, "loras", ())))
        yield device


def fully_resident(item) -> bool:
    """Whether all of a handle's weights sit on the compute device while its stage runs (no block swap, no
    partial load by ComfyUI)."""
    patcher = getattr(item, "patcher", None)
    partial = patcher is not None and getattr(patcher.model, "model_lowvram", False)
    return not getattr(item, "block_swap", 0) and not partial


def capturable_steps(item, decode_steps: str) -> str:
    """``decode_steps`` for the AR sampler: a CUDA graph cannot hold the weight copies of block swap or of a
    partial load, so those run eagerly (and say so once)."""
    if decode_steps == "eager" or fully_resident(item):
        return decode_steps
    _say_once("graph_offload", f"decode_steps {decode_steps!r} needs the whole AR model on the GPU; it is partly "
                               f"on the offload device (block_swap or ComfyUI's partial load), so the steps run "
                               f"eagerly.")
    return "eager"


@contextmanager
def on_compute_device(*items, **options):
    """``_on_compute_device`` within a ``run_scope``: a node called on its own starts a run there."""
    with run_scope(), _on_compute_device(*items, **options) as placed:
        yield placed


@contextmanager
def _on_compute_device(*items, stage: str = "this node", advice: str = "lower the image size or the number of images",
                       memory_required: int = 0):
    """Run the models of ``items`` (the pack's handles, or bare modules) on the compute device.

    Inside ComfyUI each handle's ``ModelPatcher`` goes through ComfyUI's ``load_models_gpu``: the model stays
    on the GPU after the stage while it fits, is evicted when other models need the room, and is loaded partly
    (the rest streamed per layer) when the card is too small. Outside ComfyUI the weights take the GPU only while
    the stage runs (stage swap, so the 9B AR model and the 7B decoder never sit there together); a handle's
    ``block_swap`` keeps that many of its blocks on the offload device, streamed in one at a time.
    Running out of memory frees what the stage took and says what to lower.
    """
    device = get_device()
    modules = [_module(item) for item in items]
    weights = _weight_bytes(modules)
    placement = (_comfy_placement(items, device, memory_required) if _mm is not None
                 else _swap_placement(items, device))
    try:
        try:
            placed = placement.__enter__()
        except torch.OutOfMemoryError:
            placement = None
            raise OutOfMemory(f"Out of memory on {device} moving the weights of {stage} ({weights / 2**30:.1f} GB) "
                              f"there: unload other models or close other programs using the GPU, or load the "
                              f"model in a smaller format (fp8_e4m3fn, a GGUF file) or with block_swap.") from None
        try:
            yield placed
        except torch.OutOfMemoryError as e:
            if isinstance(e, OutOfMemory):
                raise
            raise OutOfMemory(f"Out of memory on {device} in {stage}: {advice}, or close other programs using "
                              f"the GPU. ({str(e).splitlines()[0]})") from None
    finally:
        if placement is not None:
            placement.__exit__(None, None, None)
        if _mm is None and device.type != "cpu":
            soft_empty_cache()


# ---- live previews ----------------------------------------------------------------------------
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


# ---- model folders ----------------------------------------------------------------------------
RELEASE_FOLDER = "glm_image"          # whole diffusers-format release folders
SINGLE_FILE_FOLDERS = {
    "transformer": "diffusion_models",
    "vision_language_encoder": "text_encoders",
    "text_encoder": "text_encoders",
    "vae": "vae",
}
# .gguf files live in the standard folders; ComfyUI-GGUF lists them under these keys (same paths, .gguf only)
GGUF_KEYS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}


def register_model_folders() -> None:
    """Register the ``glm_image`` folder (release folders) and the GGUF views of the diffusion_models (models/unet
    too) and text_encoders folders with ComfyUI."""
    if _folder_paths is None:
        return
    path = os.path.join(_folder_paths.models_dir, RELEASE_FOLDER)
    if RELEASE_FOLDER not in _folder_paths.folder_names_and_paths:
        _folder_paths.folder_names_and_paths[RELEASE_FOLDER] = ([path], set())
    for kind, key in GGUF_KEYS.items():
        if key not in _folder_paths.folder_names_and_paths and kind in _folder_paths.folder_names_and_paths:
            _folder_paths.folder_names_and_paths[key] = (_folder_paths.folder_names_and_paths[kind][0], {".gguf"})


def list_release_folders() -> list[str]:
    """Names of release folders (those with a model_index.json) in ComfyUI's ``glm_image`` folders."""
    if _folder_paths is None:
        return []
    names = []
    for base in _folder_paths.get_folder_paths(RELEASE_FOLDER):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if os.path.isfile(os.path.join(base, name, "model_index.json")):
                    names.append(name)
    return names


def list_single_files(kind: str) -> list[str]:
    if _folder_paths is None:
        return []
    return [n for n in _folder_paths.get_filename_list(kind) if n.endswith(".safetensors")]


def list_gguf_files(kind: str) -> list[str]:
    """``.gguf`` files in ComfyUI's ``kind`` folders (diffusion_models also covers models/unet)."""
    key = GGUF_KEYS.get(kind)
    if _folder_paths is None or key is None or key not in _folder_paths.folder_names_and_paths:
        return []
    return [n for n in _folder_paths.get_filename_list(key) if n.endswith(".gguf")]


def list_pt_files(kind: str) -> list[str]:
    """Legacy ``.pt``/``.pth`` files in ComfyUI's ``kind`` folders (read with ``weights_only=True``)."""
    if _folder_paths is None:
        return []
    return [n for n in _folder_paths.get_filename_list(kind) if n.endswith((".pt", ".pth"))]


def list_model_dirs(kind: str) -> list[str]:
    """Sub-folders holding a config.json in ComfyUI's ``kind`` folders (multi-file models such as GLM-V)."""
    if _folder_paths is None:
        return []
    names = []
    for base in _folder_paths.get_folder_paths(kind):
        if os.path.isdir(base):
            names += [n for n in sorted(os.listdir(base)) if os.path.isfile(os.path.join(base, n, "config.json"))]
    return names


def resolve_checkpoint(name: str, kind: str) -> str:
    """Turn a loader's choice into a path: an absolute path as is, else a release folder name in
    ``models/glm_image`` or a file name in the ComfyUI folder ``kind``."""
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        if not os.path.exists(expanded):
            raise FileNotFoundError(f"{name} does not exist.")
        return expanded
    if _folder_paths is not None:
        for base in _folder_paths.get_folder_paths(RELEASE_FOLDER):
            candidate = os.path.join(base, name)
            if os.path.isdir(candidate):
                return candidate
        for base in _folder_paths.get_folder_paths(kind):
            candidate = os.path.join(base, name)
            if os.path.isdir(candidate):
                return candidate
        path = _folder_paths.get_full_path(kind, name)
        if path:
            return path
    raise FileNotFoundError(
        f"Checkpoint {name!r} not found. Put a release folder in models/{RELEASE_FOLDER}/, a single file in "
        f"models/{kind}/, or give an absolute path.")


LORA_FOLDER = "loras"


def list_lora_files() -> list[str]:
    """The files of ComfyUI's ``loras`` folders (a PEFT adapter shows as ``<folder>/adapter_model.safetensors``)."""
    if _folder_paths is None:
        return []
    return list(_folder_paths.get_filename_list(LORA_FOLDER))


def resolve_lora(name: str) -> str:
    """A LoRA node's choice as a path: a path as is, else a file (or PEFT adapter folder) in ``models/loras``."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    if _folder_paths is not None and not os.path.isabs(expanded):
        path = _folder_paths.get_full_path(LORA_FOLDER, name)
        if path:
            return path
        for base in _folder_paths.get_folder_paths(LORA_FOLDER):
            if os.path.isdir(os.path.join(base, name)):
                return os.path.join(base, name)
    raise FileNotFoundError(f"LoRA {name!r} not found. Put it in models/{LORA_FOLDER}/ (a PEFT adapter as its "
                            f"folder), or give a path.")
