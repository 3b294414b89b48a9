"""Start the AR service on a local Ray cluster (2 CPUs, no dashboard) with the tiny release, for the tests."""
from __future__ import annotations

import json
import socket
import time
import urllib.request

from glm_image_nodes.serving.cli import start
from glm_image_nodes.serving.settings import ServeSettings
from glm_image_nodes.testing.tiny_release import write_tiny_release


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(url: str, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return health(url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def start_service(folder: str, max_batch: int = 4, batch_wait_ms: float = 300.0, max_queue: int = 8):
    release = write_tiny_release(folder)
    settings = ServeSettings(release, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                             dtype="fp32", threads=1, cpus_per_replica=1.0)
    port = free_port()
    start(settings, "127.0.0.1", port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url, release
