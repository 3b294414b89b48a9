"""AR token sampling on a server, through SGLang's ``POST /generate`` contract (stdlib HTTP only).

The request is the one SGLang's GLM-Image pipeline makes of its AR: the pack's own prompt ids
(``ar_prompt.build_ar_inputs``; for editing the source grids' ids are already expanded in them),
``image_data[0].image_grid_thw``: the processor's grids (``[1, h, w]`` per source, then ``[1, th, tw]``,
then in text-to-image ``[1, ph, pw]``), and ``sampling_params`` with ``max_new_tokens`` = the generated
tokens + 1 (the end marker) and ``ignore_eos``. The reply's ``output_ids`` hold the preview grid first,
then the target grid (then the end marker).

Masking: the AR scores all vision ids (16,512 in the release) and the pack samples only from the codebook
(16,384). The request asks for that through ``sampling_params.logit_bias`` (SGLang's field, ids as
strings) with ``MASK_BIAS`` on every id from the codebook size up to the vision vocabulary; the pack's own
service always masks. Every returned id is checked all the same.

Every failure is one ``RemoteARError`` line: server down, wrong URL, not SGLang-shaped, an HTTP error with
the server's message, a reply of the wrong length or with ids out of range, a timeout. One request, no
retries; while it waits, ``interrupt_check`` (ComfyUI's Stop button) is polled and aborts the wait.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Callable

import torch

from ..runtime import checks
from .ar_prompt import ARInputs, TextTokenizer, build_ar_inputs
from .handles import TokenGrid
from .settings import ARSampling

MASK_BIAS = -1.0e9       # added to the logits of ids the pack never samples (>= the codebook size)
POLL_SECONDS = 0.1       # how often a waiting request looks at the interrupt check
DEFAULT_TIMEOUT = 600.0  # seconds; a 2048x2048 image is 4,096 + 256 tokens


class RemoteARError(RuntimeError):
    """A remote AR request failed; the message is one line saying what to do."""


def build_generate_request(tokenizer: TextTokenizer, prompt: str, height: int, width: int,
                           sampling: ARSampling, source_grids: list[torch.Tensor] | None = None
                           ) -> tuple[dict, ARInputs]:
    """The ``/generate`` body for one image, and the inputs it was built from."""
    checks.check_text(prompt, "prompt")
    inputs = build_ar_inputs(tokenizer, [prompt], height, width, source_grids)
    t = inputs.target
    sources = [[1, int(g.shape[0]), int(g.shape[1])] for g in (source_grids or [])]
    grids = sources + [[1, t.th, t.tw]] + ([] if sources else [[1, t.ph, t.pw]])
    vocabulary = tokenizer.vocabulary
    body = {
        "input_ids": inputs.input_ids[0].tolist(),
        "image_data": [{"image_grid_thw": grids}],
        "sampling_params": {
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": int(sampling.top_k),
            "max_new_tokens": inputs.num_new_tokens + 1,
            "ignore_eos": True,
            "sampling_seed": int(sampling.seed),
            "logit_bias": {str(i): MASK_BIAS for i in range(vocabulary.codebook_size,
                                                             vocabulary.vision_vocab_size)},
        },
    }
    return body, inputs


def parse_generate_reply(reply, inputs: ARInputs, codebook_size: int, url: str) -> TokenGrid:
    """The token grid from a ``/generate`` reply (``{"output_ids": [...], ...}``; a one-item list of it too)."""
    if isinstance(reply, list) and len(reply) == 1:
        reply = reply[0]
    if not isinstance(reply, dict) or not isinstance(reply.get("output_ids"), list):
        keys = sorted(reply)[:6] if isinstance(reply, dict) else type(reply).__name__
        raise RemoteARError(f"{url} did not answer like SGLang's /generate (no output_ids list; got {keys}): point "
                            f"the endpoint at an SGLang server or glm-image-serve.")
    ids = reply["output_ids"]
    need = inputs.num_new_tokens
    if len(ids) not in (need, need + 1):
        raise RemoteARError(f"{url} returned {len(ids)} token ids but the grids need {need} (+1 end marker): the "
                            f"server ignored max_new_tokens/ignore_eos or serves another model.")
    ids = ids[:need]
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < codebook_size]
    if bad:
        raise RemoteARError(f"{url} returned {len(bad)} id(s) outside the codebook [0, {codebook_size}) (first: "
                            f"{bad[0]!r}): the server did not mask the reserved vision ids (SGLang: allow "
                            f"logit_bias) or serves another release.")
    out = torch.tensor(ids, dtype=torch.long)
    t = inputs.target
    preview = None
    if len(inputs.grids) == 2:  # text-to-image: the preview comes first
        preview, out = out[:t.ph * t.pw].view(1, t.ph, t.pw), out[t.ph * t.pw:]
    return TokenGrid(ids=out.view(1, t.th, t.tw), height=t.height, width=t.width, preview=preview)


def _server_message(raw: bytes, reason: str) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("detail") or data.get("error") or data.get("message") or text)
    except ValueError:
        pass
    return " ".join(text.split())[:300] or reason


def generate_url(endpoint: str) -> str:
    endpoint = (endpoint or "").strip()
    if not endpoint.startswith(("http://", "https://")):
        raise RemoteARError(f"endpoint {endpoint!r} is not an http(s) URL: use e.g. http://127.0.0.1:30000 (an "
                            f"SGLang server or glm-image-serve).")
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/generate") else endpoint + "/generate"


def _not_answered(url: str, timeout: float) -> RemoteARError:
    return RemoteARError(f"{url} did not answer within {timeout:.0f} s: the server is busy or stuck; raise the "
                         f"timeout or check the server's log.")


def post_json(url: str, body: dict, timeout: float, interrupt_check: Callable[[], None] | None = None):
    """POST ``body``; the decoded JSON reply. One try; waits at most ``timeout`` seconds, polling
    ``interrupt_check``: when it raises, the connection is closed (the server sees the client go) and the
    exception propagates."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    result: dict = {}

    def send():
        try:
            connection.request("POST", parts.path or "/", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            result["status"], result["reason"], result["body"] = response.status, response.reason, response.read()
        except BaseException as e:  # handed to the waiting thread
            result["error"] = e

    worker = threading.Thread(target=send, name="glm-image-remote-ar", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout
    try:
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if interrupt_check is not None and worker.is_alive():
                interrupt_check()  # raises on the user's Stop
            if time.monotonic() > deadline + 1.0:
                raise _not_answered(url, timeout)
    finally:
        if worker.is_alive():
            with contextlib.suppress(OSError):
                if connection.sock is not None:
                    connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    error = result.get("error")
    if isinstance(error, (TimeoutError, socket.timeout)):
        raise _not_answered(url, timeout)
    if isinstance(error, (http.client.HTTPException, OSError)):
        raise RemoteARError(f"cannot reach {url} ({error or type(error).__name__}): is the AR server running and "
                            f"the endpoint right?")
    if error is not None:
        raise error
    status = result["status"]
    if status == 404:
        raise RemoteARError(f"{url} answered 404: no /generate there; the endpoint is the server's base URL "
                            f"(e.g. http://host:30000).")
    if status >= 400:
        hint = (" (the server failed while running it, e.g. its AR replica died: check the server's log, then queue "
                "the prompt again)" if status >= 500 and status != 503 else "")
        raise RemoteARError(f"{url} answered HTTP {status}: {_server_message(result['body'], result['reason'])}{hint}")
    try:
        return json.loads(result["body"])
    except ValueError:
        raise RemoteARError(f"{url} did not answer with JSON (got {result['body'][:80]!r}): the endpoint is not an "
                            f"SGLang server or glm-image-serve.") from None


def generate_token_grid_remote(endpoint: str, tokenizer: TextTokenizer, prompt: str, height: int, width: int,
                               sampling: ARSampling, source_grids: list[torch.Tensor] | None = None,
                               timeout: float = DEFAULT_TIMEOUT,
                               interrupt_check: Callable[[], None] | None = None) -> TokenGrid:
    """One image's token grid from the AR server at ``endpoint`` (see the module docstring)."""
    checks.check_float(timeout, "timeout", 1.0, fix="Use a timeout of at least 1 second.")
    url = generate_url(endpoint)
    body, inputs = build_generate_request(tokenizer, prompt, height, width, sampling, source_grids)
    reply = post_json(url, body, timeout, interrupt_check)
    return parse_generate_reply(reply, inputs, tokenizer.codebook_size, url)
