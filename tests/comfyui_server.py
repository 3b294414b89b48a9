"""A real, headless ComfyUI for the integration tests: started on a free port in temp folders, with the pack
loaded through a symlink in a ``custom_nodes:`` folder of ``--extra-model-paths-config`` (nothing is copied into
the ComfyUI tree), stopped by its process group.

Enabled by ``GLMIMAGE_COMFYUI=<ComfyUI tree>``, run with ``GLMIMAGE_COMFYUI_PYTHON`` (default ``python3``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

COMFYUI = os.environ.get("GLMIMAGE_COMFYUI", "")
PYTHON = os.environ.get("GLMIMAGE_COMFYUI_PYTHON", "python3")
AVAILABLE = os.path.isfile(os.path.join(COMFYUI, "main.py"))
SKIP_REASON = "set GLMIMAGE_COMFYUI to a ComfyUI tree (and GLMIMAGE_COMFYUI_PYTHON to its Python) to run"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_FOLDER = "glm-image-nodes"
STARTUP_TIMEOUT_S = 120


class Server:
    def __init__(self, url: str, log_path: str, root: str):
        self.url = url
        self.log_path = log_path
        self.root = root  # its folders: models/, input/, output/

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def comfyui(root: str, model_folders: dict[str, str], frontend: bool = False, extra_args: list[str] = ()):
    """Run ComfyUI with its folders under ``root`` and ``model_folders`` (folder key -> path) registered; the
    pack's nodes load from this worktree. ``frontend``: serve the installed frontend package (else none);
    ``extra_args``: more command-line options."""
    packs = os.path.join(root, "custom_nodes")
    os.makedirs(packs, exist_ok=True)
    os.symlink(ROOT, os.path.join(packs, PACK_FOLDER), target_is_directory=True)
    config = os.path.join(root, "extra_model_paths.yaml")
    lines = ["glm_image_nodes_test:", f"    custom_nodes: {packs}"]
    lines += [f"    {key}: {path}" for key, path in model_folders.items()]
    with open(config, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for name in ("frontend", "output", "input", "temp", "user"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    port = free_port()
    log_path = os.path.join(root, "server.log")
    command = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--disable-api-nodes", "--extra-model-paths-config", config,
               "--output-directory", os.path.join(root, "output"), "--input-directory", os.path.join(root, "input"),
               "--temp-directory", os.path.join(root, "temp"), "--user-directory", os.path.join(root, "user"),
               "--database-url", "sqlite:///:memory:"]
    if not frontend:
        command += ["--front-end-root", os.path.join(root, "frontend")]
    command += list(extra_args)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                # tiny models: one thread beats two busy ones
                                                                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    server = Server(f"http://127.0.0.1:{port}", log_path, root)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {process.returncode} during startup:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer /system_stats within {STARTUP_TIMEOUT_S} s:\n"
                                   f"{server.log()}")
            try:
                server.get_json("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        yield server
    finally:
        _stop(process)
