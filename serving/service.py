"""The Ray Serve deployment: ``POST /generate`` (SGLang's contract, plus editing) and ``GET /health``.

Requests wait in ``@serve.batch`` for up to ``batch_wait_ms``; a formed batch is split by the grids its
requests write and each group is decoded together (``ar_batch.generate_batch``) in a worker thread, so the
replica keeps accepting requests meanwhile. More than ``max_queue`` requests waiting on a replica get 503
with the reason (Ray Serve's own ``max_queued_requests`` bounds the proxy's queue as well).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .protocol import BadRequest, generate_reply, parse_generate
from .settings import ServeSettings

log = logging.getLogger("glm_image_serve")


class ARService:
    def __init__(self, settings: ServeSettings):
        import torch

        from ..core.models.glm_ar import load_ar_model
        from ..core.stages.ar_batch import PromptIds
        from ..core.stages.ar_prompt import load_text_tokenizer

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        device = "cuda" if settings.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = load_text_tokenizer(settings.release)
        self.model = load_ar_model(settings.release, dtype=settings.dtype, device=device)
        v = self.tokenizer.vocabulary
        self.ids = PromptIds(v.image_start_id, v.image_end_id, v.codebook_size, self.model.config.vocab_size)
        self.waiting = 0
        self.counter = itertools.count()
        self.batch_sizes: list[int] = []
        self.run_batch.set_max_batch_size(settings.max_batch)
        self.run_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def _decode_group(self, requests):
        from ..core.stages.ar_batch import generate_batch
        return generate_batch(self.model, requests, self.ids)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def run_batch(self, requests: list) -> list:
        from ..core.stages.ar_batch import written_grids

        groups: dict = {}
        for index, request in enumerate(requests):
            groups.setdefault(written_grids(request, self.ids), []).append(index)
        results: list = [None] * len(requests)
        for indices in groups.values():
            rows = await asyncio.to_thread(self._decode_group, [requests[i] for i in indices])
            self.batch_sizes.append(len(indices))
            for i, row in zip(indices, rows):
                results[i] = (row, len(indices))
        return results

    async def __call__(self, http: Request):
        if http.url.path.rstrip("/") in ("/health", "/health_generate", "") and http.method == "GET":
            return JSONResponse({"status": "ok", "service": "glm-image-serve", "release": self.settings.release,
                                 "pid": os.getpid(), "waiting": self.waiting, "batch_sizes": self.batch_sizes[-64:]})
        if http.url.path.rstrip("/") != "/generate" or http.method != "POST":
            return JSONResponse({"error": f"no {http.method} {http.url.path}: POST /generate or GET /health"},
                                status_code=404)
        try:
            body = json.loads(await http.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        try:
            request = parse_generate(body, self.ids, self.model.config.max_position_embeddings)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if self.waiting >= self.settings.max_queue:
            return JSONResponse({"error": f"overloaded: {self.waiting} requests already wait on this replica (max "
                                          f"{self.settings.max_queue}); retry later or start more replicas"},
                                status_code=503)
        self.waiting += 1
        try:
            ids, batch_size = await self.run_batch(request)
        finally:
            self.waiting -= 1
        return JSONResponse(generate_reply(f"glm-{os.getpid()}-{next(self.counter)}", request, ids,
                                           self.ids.image_end_id, batch_size))


def build_app(settings: ServeSettings, runtime_env: dict | None = None):
    """The bound application (``serve.run`` it with ``route_prefix="/"``)."""
    options = {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica}
    if runtime_env:
        options["runtime_env"] = runtime_env
    deployment = serve.deployment(ARService, name="GlmImageAR", num_replicas=settings.replicas,
                                  ray_actor_options=options, max_ongoing_requests=settings.max_queue + 1,
                                  max_queued_requests=settings.max_queue * settings.replicas,
                                  health_check_period_s=2, health_check_timeout_s=30)
    return deployment.bind(settings)
