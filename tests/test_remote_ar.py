"""The remote AR client (SGLang's /generate contract) and the batched sampler the AR service runs.

The contract, SGLang 0.5.23: python/sglang/multimodal_gen/runtime/pipelines_core/stages/model_specific_stages/
glm_image.py, read at commit e653a64d4800f6e40b49dd8fb27f4cfa6282a2ea (GlmImageBeforeDenoisingStage):
``_parse_and_expand_shape_info`` (the preview grid: ``int(sqrt(th / tw) * 16)`` x ``int(sqrt(tw / th) * 16)``),
``_build_image_grid_thw`` (text-to-image ``[[1, th, tw], [1, ph, pw]]``; image-to-image the sources' grids then
``[1, th, tw]``), ``_calculate_ar_generation_params`` / ``_compute_generation_params`` (``max_new_tokens`` = the
preview's + the target's tokens + 1, editing the target's + 1; the target grid starts after the preview's
tokens in the output). The HTTP field names are SGLang's ``GenerateReqInput`` (``input_ids``, ``image_data``,
``sampling_params``) and ``SamplingParams`` (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
``ignore_eos``, ``sampling_seed``, ``logit_bias``) from docs/sampling_params.md of the same repository; that
stage calls its AR in-process, so the stored sources hold no HTTP client of SGLang's own to diff against.
``_expected_body`` below restates those rules from the SGLang file, independently of the client's code.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import math
import os
import threading
import time

import pytest
import torch
from glm_image_nodes.core.models.glm_ar import load_ar_model
from glm_image_nodes.core.stages.ar_batch import PromptIds, TokenRequest, generate_batch, written_grids
from glm_image_nodes.core.stages.ar_prompt import load_text_tokenizer
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid
from glm_image_nodes.core.stages.remote_ar import (
    MASK_BIAS,
    RemoteARError,
    build_generate_request,
    generate_token_grid_remote,
    parse_generate_reply,
)
from glm_image_nodes.core.stages.settings import ARSampling
from glm_image_nodes.testing.tiny_release import write_tiny_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(write_tiny_release(str(tmp_path_factory.mktemp("serve_release"))))
    return root, load_ar_model(root, dtype="fp32", device="cpu"), load_text_tokenizer(root)


def prompt_ids(tokenizer, model) -> PromptIds:
    v = tokenizer.vocabulary
    return PromptIds(v.image_start_id, v.image_end_id, v.codebook_size, model.config.vocab_size)


def _expected_body(input_ids, target, preview, sources, sampling):
    """The body by SGLang's rules (module docstring)."""
    if preview is not None:  # SGLang's _parse_and_expand_shape_info
        ratio = target[0] / target[1]
        assert preview == (int(math.sqrt(ratio) * 16), int(math.sqrt(1 / ratio) * 16))
    grids = [[1, h, w] for h, w in sources] + [[1, *target]] + ([[1, *preview]] if not sources else [])
    sizes = [t * h * w for t, h, w in grids]
    generated = sizes[-1] if sources else sum(sizes)  # SGLang: grid_sizes[-1] for i2i, the sum for t2i
    return {"input_ids": input_ids, "image_data": [{"image_grid_thw": grids}],
            "sampling_params": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                                "max_new_tokens": generated + 1, "ignore_eos": True, "sampling_seed": sampling.seed,
                                "logit_bias": {str(i): MASK_BIAS for i in range(16384, 16512)}}}


def test_request_body_is_sglangs_field_by_field(release):
    _, _, tok = release
    sampling = ARSampling(seed=42, temperature=0.8, top_p=0.7, top_k=100)
    body, inputs = build_generate_request(tok, "a red fox", 1024, 768, sampling)
    ids = tok.encode("a red fox<sop>32 24<eop><sop>18 13<eop>" + tok.image_start)
    assert body == _expected_body(ids, (32, 24), (18, 13), [], sampling)
    assert json.loads(json.dumps(body)) == body  # plain JSON
    for height, width in ((1344, 768), (512, 2048), (2048, 1024)):
        body, inputs = build_generate_request(tok, "a red fox", height, width, sampling)
        t = inputs.target
        assert body == _expected_body(body["input_ids"], (t.th, t.tw), (t.ph, t.pw), [], sampling)
        assert (t.th, t.tw) == (height // 32, width // 32)
    source = torch.arange(12).view(3, 4)
    body, _ = build_generate_request(tok, "make it blue", 512, 512, sampling, [source])
    expected = _expected_body(body["input_ids"], (16, 16), None, [(3, 4)], sampling)
    assert body == expected and body["sampling_params"]["max_new_tokens"] == 16 * 16 + 1
    assert body["input_ids"].count(tok.image_end_id) == 1 and list(range(12)) == [
        i for i in body["input_ids"] if i < 12]


def test_sglang_shaped_reply_is_parsed(release):
    _, _, tok = release
    _, inputs = build_generate_request(tok, "a cat", 128, 96, ARSampling(seed=1))
    t = inputs.target
    preview, target = list(range(t.ph * t.pw)), list(range(5000, 5000 + t.th * t.tw))
    reply = {"text": "", "output_ids": preview + target + [16385], "meta_info": {"finish_reason": {"type": "length"}}}
    grid = parse_generate_reply(reply, inputs, 16384, "http://x/generate")
    assert grid.ids.flatten().tolist() == target and grid.preview.flatten().tolist() == preview
    assert grid.ids.shape == (1, t.th, t.tw) and (grid.height, grid.width) == (128, 96)
    with pytest.raises(RemoteARError, match="returned 3 token ids"):
        parse_generate_reply({"output_ids": [1, 2, 3]}, inputs, 16384, "u")
    with pytest.raises(RemoteARError, match="outside the codebook.*16400"):
        parse_generate_reply({"output_ids": preview + target[:-1] + [16400, 16385]}, inputs, 16384, "u")
    with pytest.raises(RemoteARError, match="did not answer like SGLang"):
        parse_generate_reply({"images": []}, inputs, 16384, "u")


class _Canned(http.server.BaseHTTPRequestHandler):
    replies: dict = {}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, text, delay = self.replies[self.path]
        if delay:
            threading.Event().wait(delay)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Canned.replies
    server.shutdown()
    server.server_close()


def test_every_failure_is_one_clear_line(release, canned):
    _, _, tok = release
    url, replies = canned
    sampling = ARSampling(seed=1)

    def call(endpoint, **kw):
        return generate_token_grid_remote(endpoint, tok, "a cat", 128, 96, sampling, **kw)

    with pytest.raises(RemoteARError, match="cannot reach .*is the AR server running"):
        call("http://127.0.0.1:9")
    with pytest.raises(RemoteARError, match="not an http"):
        call("127.0.0.1:30000")
    replies["/generate"] = (404, "Not Found", 0)
    with pytest.raises(RemoteARError, match="404: no /generate there"):
        call(url)
    replies["/generate"] = (503, json.dumps({"detail": "queue full (8 waiting)"}), 0)
    with pytest.raises(RemoteARError, match=r"HTTP 503: queue full \(8 waiting\)"):
        call(url)
    replies["/generate"] = (200, "<html>hello</html>", 0)
    with pytest.raises(RemoteARError, match="did not answer with JSON"):
        call(url + "/")
    replies["/generate"] = (200, json.dumps({"output_ids": [1]}), 3)
    with pytest.raises(RemoteARError, match="did not answer within 1 s"):
        call(url, timeout=1.0)

    def stop():
        raise KeyboardInterrupt("stop pressed")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="stop pressed"):  # the reply would take 3 s
        call(url, interrupt_check=stop)
    assert time.monotonic() - started < 1.5


def _local(model, tok, prompt, seed, sources=None, **kw):
    size = (128, 128) if sources else (128, 96)
    grid = generate_token_grid(model, tok, prompt, *size, ARSampling(seed=seed, **kw), source_grids=sources)
    ids = grid.ids.flatten().tolist()
    return (grid.preview.flatten().tolist() + ids) if grid.preview is not None else ids


def _request(tok, prompt, seed, sources=None, **kw):
    size = (128, 128) if sources else (128, 96)
    body, _ = build_generate_request(tok, prompt, *size, ARSampling(seed=seed, **kw), sources)
    return TokenRequest(tuple(body["input_ids"]), tuple((h, w) for _, h, w in body["image_data"][0]["image_grid_thw"]),
                        ARSampling(seed, **kw))


def test_batched_rows_equal_the_local_sampler(release):
    _, model, tok = release
    ids = prompt_ids(tok, model)
    cases = [("a cat", 3, {}), ("a much longer prompt about 32 dogs on a mat", 4, {"temperature": 1.2, "top_k": 40}),
             ("x", 3, {"temperature": 0.0}), ("a cat", 5, {"top_p": 0.3}), ("a dog on a sofa", 6, {}),
             ("y", 4, {"temperature": 0.0})]
    requests = [_request(tok, p, s, **kw) for p, s, kw in cases]
    assert len({written_grids(r, ids) for r in requests}) == 1
    batched = generate_batch(model, requests, ids)
    for (prompt, seed, kw), row in zip(cases, batched):
        assert row == _local(model, tok, prompt, seed, **kw)  # exact: same ids, whatever the batch
    assert batched[0] != batched[3]
    sources = [torch.arange(16).view(4, 4) * 1000]
    edits = [_request(tok, "make it blue", 7, sources), _request(tok, "make it a longer blue thing", 9, sources)]
    for (prompt, seed), row in zip([("make it blue", 7), ("make it a longer blue thing", 9)],
                                   generate_batch(model, edits, ids)):
        assert row == _local(model, tok, prompt, seed, sources)
    with pytest.raises(ValueError, match="same grids"):
        generate_batch(model, [requests[0], edits[0]], ids)


def test_nodes_check_inputs_and_load_no_ar_weights(release, tmp_path):
    import shutil

    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS
    root, _, tok = release
    # the release's tokenizer and AR config alone: no weights to read
    shutil.copytree(os.path.join(root, "processor"), tmp_path / "processor")
    (tmp_path / "vision_language_encoder").mkdir()
    shutil.copy(os.path.join(root, "vision_language_encoder", "config.json"), tmp_path / "vision_language_encoder")
    (loaded,) = NODE_CLASS_MAPPINGS["GLMImageARTokenizerLoader"]().load(str(tmp_path))
    assert loaded.vocabulary == dataclasses.replace(tok.vocabulary, source=loaded.vocabulary.source)
    assert loaded.encode("a cat") == tok.encode("a cat")
    node = NODE_CLASS_MAPPINGS["GLMImageARServerSampler"]
    good = dict(endpoint="http://127.0.0.1:30000", prompt="a cat", width=1024, height=1024, seed=1, temperature=0.9,
                top_p=0.75, top_k=16512)
    assert node.VALIDATE_INPUTS(**good) is True
    assert "not an http(s) URL" in node.VALIDATE_INPUTS(**{**good, "endpoint": "localhost:30000"})
    assert "top_p" in node.VALIDATE_INPUTS(**{**good, "top_p": 0.0})
    assert "multiples of 32" in node.VALIDATE_INPUTS(**{**good, "width": 1000})
    with pytest.raises(RemoteARError, match="cannot reach"):
        node().sample(loaded, "http://127.0.0.1:9", "a cat", 512, 512, 1, 0.9, 0.75, 16512, timeout=5)


def test_service_protocol_refuses_what_it_cannot_run(release):
    from glm_image_nodes.serving.protocol import BadRequest, parse_generate
    _, model, tok = release
    ids = prompt_ids(tok, model)
    body, _ = build_generate_request(tok, "a cat", 128, 96, ARSampling(seed=3, top_k=40))
    request = parse_generate(body, ids, 131072)
    assert request.sampling == ARSampling(3, 0.9, 0.75, 40) and request.grids == ((4, 3), (18, 13))
    sglang_default = {**body, "sampling_params": {**body["sampling_params"], "top_k": -1}}
    assert parse_generate(sglang_default, ids, 131072).sampling.top_k == 16512  # SGLang's -1: no top-k
    for change, says in ((lambda b: b.update(image_data=[{"image_grid_thw": [[2, 4, 3], [1, 16, 16]]}]), "image_data"),
                         (lambda b: b["sampling_params"].update(ignore_eos=False), "ignore_eos must be true"),
                         (lambda b: b["sampling_params"].update(logit_bias={"5": -1e9}), "logit_bias may only mask"),
                         (lambda b: b["sampling_params"].update(logit_bias={"16400": "x"}), "logit_bias may only"),
                         (lambda b: b["sampling_params"].update(logit_bias={"\u00b2": -1e9}), "logit_bias may only"),
                         (lambda b: b["sampling_params"].update(temperature="hot"), "temperature must be a number"),
                         (lambda b: b["sampling_params"].update(sampling_seed=math.inf), "sampling_seed must be an"),
                         (lambda b: b["sampling_params"].update(top_k=math.nan), "top_k must be an integer"),
                         (lambda b: b.update(input_ids=b["input_ids"][:-1]), "image start marker"),
                         (lambda b: b.update(text="a cat", input_ids=None), "input_ids")):
        broken = json.loads(json.dumps(body))
        change(broken)
        with pytest.raises(BadRequest, match=says):
            parse_generate(broken, ids, 131072)
