"""The AR service on a real local Ray cluster (ray[serve], started once per run: the ``ar_service`` fixture).

Tokens from the service equal the local AR sampler's for the same seed, alone and batched with concurrent
requests of other seeds, settings and prompt lengths; a client that disconnects mid-request does not hurt it;
a killed replica gives the waiting client a clear error and the service answers again after Serve restarts it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse

import pytest
import torch
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.remote_ar import (
    RemoteARError,
    build_generate_request,
    generate_token_grid_remote,
    post_json,
)
from glm_image_nodes.core.stages.settings import ARSampling
from ray_service import health, wait_healthy

pytest.importorskip("ray")

SOURCES = [torch.arange(16).view(4, 4) * 1000]


@pytest.fixture(scope="module")
def local(ar_service):
    _, release = ar_service
    return load_ar_model(release, dtype="fp32", device="cpu"), load_text_tokenizer(release)


def _size(sources):
    return (128, 128) if sources else (128, 96)


def _both(url, local, prompt, seed, sources=None, **kw):
    model, tok = local
    remote = generate_token_grid_remote(url, tok, prompt, *_size(sources), ARSampling(seed=seed, **kw), sources,
                                        timeout=120)
    alone = generate_token_grid(model, tok, prompt, *_size(sources), ARSampling(seed=seed, **kw), source_grids=sources)
    return remote, alone


def _same(remote, alone):
    assert torch.equal(remote.ids, alone.ids)
    assert (remote.preview is None) == (alone.preview is None)
    if remote.preview is not None:
        assert torch.equal(remote.preview, alone.preview)


def test_alone_text_to_image_and_editing(ar_service, local):
    url, _ = ar_service
    _same(*_both(url, local, "a red fox in the snow", 11))
    _same(*_both(url, local, "make it blue", 12, SOURCES, temperature=1.1, top_k=64))


def test_batched_with_other_seeds_and_prompt_lengths(ar_service, local):
    url, _ = ar_service
    cases = [("a cat", 1, None, {}), ("a much longer prompt: 32 dogs on a red mat, watercolor", 2, None,
                                      {"top_p": 0.5}),
             ("x", 3, None, {"temperature": 0.0}), ("make it blue", 4, SOURCES, {}),
             ("make the sky much greener than before", 5, SOURCES, {"temperature": 0.7})]
    before = len(health(url)["batch_sizes"])
    results: dict = {}

    def run(i, case):
        prompt, seed, sources, kw = case
        try:
            results[i] = generate_token_grid_remote(url, local[1], prompt, *_size(sources),
                                                    ARSampling(seed=seed, **kw), sources, timeout=120)
        except Exception as e:  # handed to the test thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    model, tok = local
    for i, (prompt, seed, sources, kw) in enumerate(cases):
        assert not isinstance(results[i], Exception), results[i]
        _same(results[i], generate_token_grid(model, tok, prompt, *_size(sources), ARSampling(seed=seed, **kw),
                                              source_grids=sources))
    formed = health(url)["batch_sizes"][before:]
    assert sum(formed) == len(cases) and max(formed) >= 2, formed  # really decoded together


def _raw_post(url: str, body: dict) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_survives_a_client_that_disconnects(ar_service, local):
    url, _ = ar_service
    body, _ = build_generate_request(local[1], "a cat", 128, 96, ARSampling(seed=5))
    for _ in range(2):
        _raw_post(url, body).close()  # gone before the reply
    _same(*_both(url, local, "a dog", 6))
    assert health(url)["status"] == "ok"


def test_bad_request_is_a_400_with_the_reason(ar_service, local):
    url, _ = ar_service
    body, _ = build_generate_request(local[1], "a cat", 128, 96, ARSampling(seed=5))
    body["sampling_params"]["max_new_tokens"] = 10
    with pytest.raises(RemoteARError, match=r"HTTP 400: sampling_params.max_new_tokens must be 247"):
        post_json(url + "/generate", body, 30)


def test_killed_replica_gives_a_clear_error_then_recovers(ar_service, local):
    import ray
    url, _ = ar_service
    pid = health(url)["pid"]
    body, _ = build_generate_request(local[1], "a cat " * 40, 128, 96, ARSampling(seed=8))
    failure: dict = {}

    def wait():
        try:
            post_json(url + "/generate", body, 60)
        except RemoteARError as e:
            failure["error"] = e

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.3)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "GlmImageAR" in a["name"]]
    assert names, "no replica actor found"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    waiting.join(90)
    message = str(failure.get("error"))
    assert "HTTP 500" in message and "replica died" in message and "\n" not in message
    deadline = time.monotonic() + 90
    while health(url)["pid"] == pid if _up(url) else True:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.5)
    wait_healthy(url)
    _same(*_both(url, local, "after the restart", 9))


def _up(url: str) -> bool:
    try:
        health(url)
        return True
    except Exception:
        return False


def test_overload_is_a_503_with_the_reason_and_the_service_goes_on(ar_service, local):
    url, _ = ar_service
    body, _ = build_generate_request(local[1], "a cat", 128, 96, ARSampling(seed=1))
    outcomes: list = []

    def send():
        try:
            post_json(url + "/generate", body, 120)
            outcomes.append("ok")
        except RemoteARError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=send) for _ in range(20)]  # the fixture's queue holds 8 per replica
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    refused = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 20 and refused and "ok" in outcomes, outcomes
    assert all("HTTP 503" in o for o in refused), refused
    assert any("overloaded" in o or "backpressure" in o.lower() for o in refused), refused
    _same(*_both(url, local, "after the rush", 2))


def test_command_refuses_a_bad_release_before_starting_ray(tmp_path, capsys):
    from glm_image_nodes.serving import cli
    with pytest.raises(SystemExit):
        cli.main(["--release", str(tmp_path / "missing")])
    assert "is not a folder: give the GLM-Image release folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="bad release: No GLM-Image tokenizer found"):
        cli.main(["--release", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["--release", str(tmp_path), "--port", "70000"])
    assert "--port must be 1..65535 (got 70000)" in capsys.readouterr().err


def test_command_refuses_a_malformed_ray_address_in_one_line(tmp_path):
    """In a fresh process (this one may hold the test cluster): Ray's ValueError becomes the command's one line."""
    import subprocess
    import sys

    from glm_image_nodes.testing.tiny_release import write_tiny_release
    release = write_tiny_release(str(tmp_path / "GLM-Image"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from standalone import register_pack; register_pack(); "
            "from glm_image_nodes.serving.cli import main; main(['--release', sys.argv[2], '--address', 'foo'])")
    done = subprocess.run([sys.executable, "-c", code, root, str(release)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "glm-image-serve: cannot reach the Ray cluster at --address 'foo': Invalid address format" in done.stderr
