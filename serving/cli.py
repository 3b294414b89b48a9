"""``glm-image-serve``: the pack's AR on Ray Serve, one or more replicas, on this machine or a Ray cluster.

    glm-image-serve --release /models/GLM-Image [--replicas N] [--gpus-per-replica G] [--address ray://head:10001]
                    [--host 0.0.0.0] [--port 30000] [--max-batch 8] [--batch-wait-ms 50] [--max-queue 32]

Workers point the "AR Token Sampler (server)" node at ``http://host:port``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from .settings import ServeSettings

PACKAGE = "glm_image_nodes"


def package_runtime_env() -> dict:
    """Make ``glm_image_nodes`` importable in this machine's Ray workers when the pack runs from a checkout
    (not pip-installed): a folder with a ``glm_image_nodes`` link to the checkout goes on their PYTHONPATH.
    On a multi-node cluster install the pack on every node instead."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(root) == PACKAGE:
        parent = os.path.dirname(root)
    else:
        parent = tempfile.mkdtemp(prefix="glm_image_serve_")
        os.symlink(root, os.path.join(parent, PACKAGE))
    paths = [parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def check_release(release: str) -> None:
    """Fail before starting Ray when the release cannot serve: its tokenizer and AR config must load."""
    from ..core.formats.reading import CheckpointError
    from ..core.stages.ar_prompt import load_text_tokenizer
    try:
        load_text_tokenizer(release)
    except CheckpointError as e:
        raise SystemExit(f"glm-image-serve: bad release: {e}") from None
    if not os.path.isdir(os.path.join(release, "vision_language_encoder")):
        raise SystemExit(f"glm-image-serve: bad release: {release} has no vision_language_encoder/ folder (the AR "
                         f"weights); give the GLM-Image release folder.")


def parse_args(argv=None) -> tuple[argparse.Namespace, ServeSettings]:
    p = argparse.ArgumentParser(prog="glm-image-serve", description=__doc__.split("\n")[0])
    p.add_argument("--release", required=True, help="GLM-Image release folder")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--address", default=None, help="Ray cluster (ray://head:10001 or auto); default: a local one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per replica")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:  # else Ray starts (seconds) and Serve's proxy fails with a traceback
        p.error(f"--port must be 1..65535 (got {args.port}).")
    try:
        settings = ServeSettings(os.path.abspath(args.release), args.replicas, args.gpus_per_replica,
                                 args.cpus_per_replica, args.max_batch, args.batch_wait_ms, args.max_queue, args.dtype,
                                 args.threads)
    except ValueError as e:
        p.error(str(e))
    return args, settings


def start(settings: ServeSettings, host: str, port: int, address: str | None = None, num_cpus: int | None = None):
    """Start (or join) Ray, then Serve on ``host:port``; returns once the service answers."""
    import ray
    from ray import serve

    from .service import build_app

    if not ray.is_initialized():
        if address is None:  # a local cluster: its workers run the AR, at normal priority (Ray nices them to 15)
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False)
        except (ValueError, ConnectionError) as e:  # a malformed address; a cluster that does not answer
            raise SystemExit(f"glm-image-serve: cannot reach the Ray cluster at --address {address!r}: {e}. Give "
                             f"ray://HEAD:10001 or auto, or leave --address out for a local cluster.") from None
    serve.start(http_options={"host": host, "port": port})
    local = address is None or address == "local"
    serve.run(build_app(settings, package_runtime_env() if local else None), name="glm-image", route_prefix="/")


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    check_release(settings.release)
    started = time.monotonic()
    start(settings, args.host, args.port, args.address)
    print(f"glm-image-serve: {settings.replicas} replica(s) of {settings.release} on http://{args.host}:{args.port} "
          f"(POST /generate, GET /health) after {time.monotonic() - started:.1f} s; Ctrl+C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
