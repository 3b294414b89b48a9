"""The headless client against a stand-in ComfyUI server (HTTP only: the client falls back to polling)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from glm_image_nodes.headless import client

PNG = b"\x89PNG\r\n\x1a\nfake"


class FakeComfy(BaseHTTPRequestHandler):
    prompts: dict = {}
    polls: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, code, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        graph = payload["prompt"]
        if any(n["class_type"] == "Unknown" for n in graph.values()):
            return self._reply(400, {"error": {"type": "prompt_outputs_failed_validation",
                                               "message": "Prompt outputs failed validation"},
                                     "node_errors": {"2": {"class_type": "Unknown", "errors": [
                                         {"type": "value_not_in_list", "message": "Value not in list",
                                          "details": "checkpoint: 'x' not in []"}]}}})
        prompt_id = f"p{len(self.prompts)}"
        self.prompts[prompt_id] = graph
        self._reply(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})

    def do_GET(self):
        if self.path.startswith("/history/"):
            prompt_id = self.path.rsplit("/", 1)[1]
            self.polls[prompt_id] = self.polls.get(prompt_id, 0) + 1
            if self.polls[prompt_id] < 2:
                return self._reply(200, {})
            graph = self.prompts[prompt_id]
            if graph["1"]["inputs"].get("fail"):
                status = {"status_str": "error", "completed": False, "messages": [
                    ["execution_error", {"node_id": "1", "node_type": "GLMImageARSampler",
                                         "exception_type": "ValueError", "exception_message": "height must be >= 32"}]]}
                return self._reply(200, {prompt_id: {"status": status, "outputs": {}}})
            outputs = {"9": {"images": [{"filename": "GLMImage_00001_.png", "subfolder": "", "type": "output"}]}}
            return self._reply(200, {prompt_id: {"status": {"status_str": "success", "completed": True,
                                                            "messages": []}, "outputs": outputs}})
        if self.path.startswith("/view?"):
            return self._reply(200, PNG, "image/png")
        self._reply(404, {})


def _serve(handler):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def server():
    yield from _serve(FakeComfy)


def test_run_saves_outputs(server, tmp_path):
    events = []
    saved = client.run(server, {"1": {"class_type": "GLMImageARSampler", "inputs": {}}}, str(tmp_path), events.append)
    assert [p.endswith("GLMImage_00001_.png") for p in saved] == [True]
    assert open(saved[0], "rb").read() == PNG
    assert events[0].startswith("queued as ")


def test_validation_errors_name_the_node(server, tmp_path):
    with pytest.raises(client.WorkflowError, match=r"node 2 \(Unknown\): value_not_in_list: checkpoint"):
        client.run(server, {"2": {"class_type": "Unknown", "inputs": {}}}, str(tmp_path), lambda e: None)


def test_execution_error_reports_the_exception(server, tmp_path):
    graph = {"1": {"class_type": "GLMImageARSampler", "inputs": {"fail": True}}}
    with pytest.raises(client.WorkflowError, match="node 1 .*ValueError: height must be >= 32"):
        client.run(server, graph, str(tmp_path), lambda e: None)


def test_set_input_parses_values():
    graph = {"5": {"class_type": "GLMImageARSampler", "inputs": {"seed": 1, "prompt": "a"}}}
    client.set_input(graph, "5.seed=7")
    client.set_input(graph, '5.prompt=a sign that says "hi"')
    client.set_input(graph, "5.prompt=42")  # a string input stays a string
    assert graph["5"]["inputs"] == {"seed": 7, "prompt": "42"}
    with pytest.raises(client.WorkflowError, match="no node '6'"):
        client.set_input(graph, "6.seed=1")
    with pytest.raises(client.WorkflowError, match=r"has no input 'steps'; its inputs: seed, prompt"):
        client.set_input(graph, "5.steps=3")
    with pytest.raises(client.WorkflowError, match="not a valid value for seed"):
        client.set_input(graph, "5.seed=seven")


class NotComfy(BaseHTTPRequestHandler):
    """A web server that is not ComfyUI: HTML for everything."""

    def log_message(self, *args):
        pass

    def _html(self, code):
        data = b"<html><body>It works!</body></html>"
        self.send_response(code)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._html(200)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._html(200 if self.path == "/prompt" else 404)


@pytest.fixture()
def not_comfy():
    yield from _serve(NotComfy)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(capsys, *argv) -> str:
    """Run the client's command line; return its one-line error."""
    assert client.main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_command_line_errors_are_one_line(tmp_path, capsys, not_comfy):
    api = tmp_path / "api.json"
    api.write_text(json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}}))
    cases = [
        ((str(tmp_path / "missing.json"),), "workflow file " + str(tmp_path / "missing.json") + " not found."),
        ((str(tmp_path),), "is a folder: give the workflow's .json file"),
    ]
    (tmp_path / "broken.json").write_text('{"1": {"class_type": ')
    cases.append(((str(tmp_path / "broken.json"),), "is not valid JSON (Expecting value at line 1 column 22)"))
    (tmp_path / "ui.json").write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    cases.append(((str(tmp_path / "ui.json"),), "is a UI-format workflow: export it in API format (in ComfyUI: "
                                                "Workflow > Export (API)) and pass that file."))
    (tmp_path / "list.json").write_text("[1, 2]")
    cases.append(((str(tmp_path / "list.json"),), "is not an API-format workflow"))
    (tmp_path / "node.json").write_text(json.dumps({"1": {"inputs": {}}}))
    cases.append(((str(tmp_path / "node.json"),), "node 1 is not an API-format node"))
    cases += [
        ((str(api), "--server", "localhost:8188"), "--server 'localhost:8188' is not an http:// address: give one such "
                                                   "as http://127.0.0.1:8188."),
        ((str(api), "--server", "http://127.0.0.1:99999"), "has an invalid port"),
        ((str(api), "--server", f"http://127.0.0.1:{_free_port()}"), "(Connection refused): is ComfyUI running at "
                                                                     "http://127.0.0.1:"),
        ((str(api), "--server", not_comfy), f"{not_comfy}/prompt answered with something that is not JSON "
                                            f"('<html><body>It works!</body></html>'): is {not_comfy} a ComfyUI "
                                            f"server?"),
        ((str(api), "--server", not_comfy + "/sub"), "/prompt answered HTTP 404 ('<html>"),
        ((str(api), "--set", "7.seed=1"), "--set 7.seed=1: no node '7' in the workflow (ids: 1)"),
        ((str(api), "--out", str(api)), f"--out {api} is a file: give a folder for the images"),
        ((str(api), "--previews", str(api)), f"--previews {api} is a file: give a folder for the images"),
    ]
    for argv, message in cases:
        assert message in _main(capsys, *argv), argv


def test_repeated_validation_messages_become_one_line():
    errors = {"5": {"class_type": "GLMImageARSampler", "errors": [
        {"type": "custom_validation_failed", "message": "Custom validation failed for node",
         "details": f"{name} - GLM-Image makes images with sides of 512..2048 px"} for name in ("prompt", "width")]
        + [{"type": "value_not_in_list", "message": "Value not in list", "details": "dtype: 'x' not in [...]"}]}}
    assert client.describe_node_errors(errors).splitlines() == [
        "node 5 (GLMImageARSampler): custom_validation_failed: GLM-Image makes images with sides of 512..2048 px",
        "node 5 (GLMImageARSampler): value_not_in_list: dtype: 'x' not in [...]"]


def test_sockets_are_closed(server, not_comfy, tmp_path):
    """A refused websocket upgrade (the stand-in server answers /ws with 404), a non-JSON server and a server that
    is down leave no socket open (ResourceWarning on collection)."""
    import gc
    import warnings

    gc.collect()  # what earlier tests left is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        client.run(server, {"1": {"class_type": "GLMImageARSampler", "inputs": {}}}, str(tmp_path), lambda e: None)
        for url in (not_comfy, f"http://127.0.0.1:{_free_port()}"):
            with pytest.raises(client.WorkflowError):
                client.run(url, {"1": {"class_type": "X", "inputs": {}}}, str(tmp_path), lambda e: None)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
def test_preview_frames_are_parsed_as_comfyui_sends_them(tmp_path):
    import struct

    # server.py send_image_with_metadata: event 4, metadata length, metadata JSON, image bytes
    metadata = json.dumps({"node_id": "7", "prompt_id": "p0", "image_type": "image/jpeg"}).encode()
    frame = struct.pack(">I", 4) + struct.pack(">I", len(metadata)) + metadata + b"\xff\xd8jpeg"
    assert client.parse_binary_event(frame) == {"type": "preview", "data": {
        "node": "7", "prompt_id": "p0", "image_type": "image/jpeg", "image": b"\xff\xd8jpeg"}}
    # send_image (clients without preview metadata): event 1, image type 2 (PNG), image bytes
    legacy = client.parse_binary_event(struct.pack(">I", 1) + struct.pack(">I", 2) + PNG)
    assert legacy["data"]["node"] is None and legacy["data"]["image_type"] == "image/png"
    assert legacy["data"]["image"] == PNG
    assert client.parse_binary_event(struct.pack(">I", 3) + b"text") is None
    save = client.preview_saver(str(tmp_path / "frames"))
    save("7", "image/jpeg", b"a")
    save("7", "image/png", b"b")
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["preview_7_0001.jpg", "preview_7_0002.png"]
