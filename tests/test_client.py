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


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeComfy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


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
