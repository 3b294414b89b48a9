"""Run an API-format workflow on a running ComfyUI server: submit, follow progress, save outputs, report errors.

Standard library only, so it runs from any Python:

    python headless/client.py example_workflows/api/glm_image_text_to_image.json --server http://127.0.0.1:8188 \
        --set 5.prompt='a sign that says "OPEN"' --set 5.seed=7 --out outputs/

``--previews DIR`` also saves the live preview frames the samplers send (ComfyUI started with
``--preview-method auto``).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


class WorkflowError(RuntimeError):
    """The workflow file, the server or a node failed; the message says which and what to do, in one line per
    problem."""


def check_server_url(server: str) -> str:
    url = urllib.parse.urlparse(server)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise WorkflowError(f"--server {server!r} is not an http:// address: give one such as http://127.0.0.1:8188.")
    try:
        url.port
    except ValueError:
        raise WorkflowError(f"--server {server!r} has an invalid port: give one such as "
                            f"http://127.0.0.1:8188.") from None
    return server.rstrip("/")


def _request(server: str, path: str, payload: dict | None = None, timeout: float = 30.0) -> bytes:
    """The body of ``server + path`` (POSTing ``payload`` as JSON); HTTP errors are raised as HTTPError, every
    other failure as a WorkflowError that says what to check."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(server.rstrip("/") + path, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise WorkflowError(f"cannot reach ComfyUI at {server} ({reason}): is ComfyUI running at {server}?") from None
    except (TimeoutError, socket.timeout):
        raise WorkflowError(f"ComfyUI at {server} did not answer {path} within {timeout:g} s: is it running and is "
                            f"the address right?") from None
    except (ConnectionError, http.client.HTTPException) as e:
        raise WorkflowError(f"the connection to {server} failed ({type(e).__name__}: {e}): is {server} a ComfyUI "
                            f"server?") from None


def _json(body: bytes, server: str, path: str):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        shown = body[:60].decode("utf-8", "replace")
        raise WorkflowError(f"{server}{path} answered with something that is not JSON ({shown!r}): is {server} a "
                            f"ComfyUI server?") from None


def describe_node_errors(node_errors: dict, graph: dict | None = None) -> str:
    """One line per distinct error. ComfyUI repeats a failed VALIDATE_INPUTS once per input it takes
    ("width - <message>", "height - <message>"): those become one line with the message."""
    lines = []
    for node_id, info in node_errors.items():
        class_type = info.get("class_type") or (graph or {}).get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            detail = err.get("details") or err.get("message", "")
            if err.get("type") == "custom_validation_failed" and " - " in detail:
                detail = detail.split(" - ", 1)[1]
            line = f"node {node_id} ({class_type}): {err.get('type', 'error')}: {detail}"
            if line not in lines:
                lines.append(line)
    return "\n".join(lines)


def submit(server: str, graph: dict, client_id: str) -> str:
    """POST the workflow; return its prompt id, or raise WorkflowError with every node error."""
    try:
        body = _json(_request(server, "/prompt", {"prompt": graph, "client_id": client_id}), server, "/prompt")
    except urllib.error.HTTPError as e:
        with e:
            raw = e.read()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WorkflowError(f"{server}/prompt answered HTTP {e.code} ({raw[:60].decode('utf-8', 'replace')!r}): "
                                f"is {server} a ComfyUI server?") from None
        error = body.get("error", {})
        message = error.get("message", f"HTTP {e.code}") if isinstance(error, dict) else str(error)
        details = describe_node_errors(body.get("node_errors", {}), graph)
        extra = f"\n{details}" if details else ""
        raise WorkflowError(f"the server rejected the workflow: {message}{extra}") from None
    if not isinstance(body, dict) or "prompt_id" not in body:
        raise WorkflowError(f"{server}/prompt answered without a prompt_id ({str(body)[:60]!r}): is {server} a "
                            f"ComfyUI server?")
    if body.get("node_errors"):
        # ComfyUI still queues the valid branches; a partial run is not what the caller asked for.
        raise WorkflowError("some nodes failed validation:\n" + describe_node_errors(body["node_errors"], graph))
    return body["prompt_id"]


def load_workflow(path: str) -> dict:
    """An API-format workflow from ``path``, or a WorkflowError saying what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as f:
            graph = json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"workflow file {path} not found.") from None
    except IsADirectoryError:
        raise WorkflowError(f"{path} is a folder: give the workflow's .json file.") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path} is not a text file: give an API-format workflow .json file.") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise WorkflowError(f"{path} is a UI-format workflow: export it in API format (in ComfyUI: Workflow > Export "
                            f"(API)) and pass that file.")
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError(f"{path} is not an API-format workflow (an object of node id -> {{class_type, inputs}}): "
                            f"export it in API format (Workflow > Export (API)).")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{path}: node {node_id} is not an API-format node ({{\"class_type\": ..., \"inputs\": "
                                f"{{...}}}}): export the workflow in API format.")
    return graph
# ComfyUI's binary websocket events (protocol.BinaryEventTypes) and the image types of a PREVIEW_IMAGE frame
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4
PREVIEW_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


def parse_binary_event(payload: bytes) -> dict | None:
    """A binary /ws message as ``{"type": "preview", "data": {...}}`` (node, prompt_id, image_type, image bytes),
    or None for other binary events."""
    (event,) = struct.unpack(">I", payload[:4])
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", payload[4:8])
        metadata = json.loads(payload[8:8 + length])
        return {"type": "preview", "data": {"node": metadata.get("node_id"), "prompt_id": metadata.get("prompt_id"),
                                            "image_type": metadata.get("image_type"), "image": payload[8 + length:]}}
    if event == PREVIEW_IMAGE:
        (kind,) = struct.unpack(">I", payload[4:8])
        return {"type": "preview", "data": {"node": None, "prompt_id": None,
                                            "image_type": PREVIEW_IMAGE_TYPES.get(kind), "image": payload[8:]}}
    return None


class _WebSocket:
    """A minimal RFC 6455 client (ComfyUI's /ws; also the tests' link to a headless browser): JSON text frames in
    and out, binary (preview) frames in, pongs to pings."""

    def __init__(self, server: str, path: str, timeout: float):
        url = urllib.parse.urlparse(server)
        self.sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {url.hostname}:{url.port or 80}\r\n"
                               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
            header = b""
            while b"\r\n\r\n" not in header:
                chunk = self.sock.recv(1)
                if not chunk:
                    raise ConnectionError("websocket handshake closed")
                header += chunk
                if len(header) > 65536:
                    raise ConnectionError("websocket handshake too long")
            if b" 101 " not in header.split(b"\r\n", 1)[0]:
                raise ConnectionError("websocket upgrade refused")
        except BaseException:
            self.sock.close()
            raise

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                    else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def send_json(self, message: dict) -> None:
        self._send(0x1, json.dumps(message).encode())

    def receive(self) -> dict | None:
        """The next JSON message, a preview frame as ``{"type": "preview", ...}``, or None for other binary
        events."""
        while True:
            b0, b1 = self._exact(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(length)
            if opcode == 0x1:
                try:
                    return json.loads(payload)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None
            if opcode == 0x2:
                return parse_binary_event(payload)
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x9:
                self._send(0xA, payload)

    def close(self) -> None:
        self.sock.close()


def follow(server: str, prompt_id: str, client_id: str, on_event=print, timeout: float = 3600.0,
           on_preview=None) -> dict:
    """Wait until the prompt finishes, reporting progress; return its /history entry or raise WorkflowError.

    ``on_preview(node, image_type, image_bytes)`` receives every live preview frame of the prompt."""
    deadline = time.monotonic() + timeout
    ws = None
    try:
        ws = _WebSocket(server, f"/ws?clientId={client_id}", timeout=5.0)
        # the server reads feature flags only from the first message; with this one preview frames name their node
        ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    except OSError:
        if ws is not None:
            ws.close()
        ws = None
    last_poll = 0.0
    try:
        while time.monotonic() < deadline:
            message = None
            if ws is not None:
                try:
                    message = ws.receive()
                except socket.timeout:
                    message = None
                except OSError:
                    ws.close()
                    ws = None
                    message = None
                if message and message.get("data", {}).get("prompt_id") in (prompt_id, None):
                    kind, data = message["type"], message["data"]
                    if kind == "preview":
                        if on_preview is not None:
                            on_preview(data["node"], data["image_type"], data["image"])
                    elif kind == "progress":
                        on_event(f"node {data['node']}: {data['value']}/{data['max']}")
                    elif kind == "executing" and data.get("node"):
                        on_event(f"running node {data['node']}")
            else:
                time.sleep(0.5)
            # /history is only written when the run ends (then "executing" with node None follows); polling it
            # after every progress message or preview frame would make the client lag far behind the server.
            frequent = message is None or message.get("type") in ("progress", "progress_state", "preview")
            if ws is not None and frequent and time.monotonic() - last_poll < 1.0:
                continue
            last_poll = time.monotonic()
            history = _json(_request(server, f"/history/{prompt_id}"), server, "/history").get(prompt_id)
            if history and history.get("status", {}).get("completed") is not None:
                status = history["status"]
                if status.get("status_str") == "success":
                    return history
                raise WorkflowError(_execution_error(status))
    finally:
        if ws is not None:
            ws.close()
    raise WorkflowError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            # ComfyUI names a custom pack's module by its file path: keep only the class name.
            exception_type = str(data.get("exception_type")).rsplit(".", 1)[-1]
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{exception_type}: {str(data.get('exception_message')).strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the workflow failed: {status}"


def save_outputs(server: str, history: dict, out_dir: str) -> list[str]:
    """Download every image the workflow produced into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    saved = []
    for output in history.get("outputs", {}).values():
        for image in output.get("images", []):
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                            "type": image.get("type", "output")})
            path = os.path.join(out_dir, os.path.basename(image["filename"]))  # never outside out_dir
            try:
                data = _request(server, f"/view?{query}")
            except urllib.error.HTTPError as e:
                e.close()
                raise WorkflowError(f"{server}/view could not send {image['filename']} (HTTP {e.code}).") from None
            with open(path, "wb") as f:
                f.write(data)
            saved.append(path)
    return saved


def set_input(graph: dict, assignment: str) -> None:
    """Apply ``NODE.INPUT=VALUE`` to an input the node already has. VALUE is taken as a string where the input
    holds one, else parsed as JSON (numbers, booleans, lists)."""
    target, _, raw = assignment.partition("=")
    node_id, _, name = target.partition(".")
    if node_id not in graph or not name:
        raise WorkflowError(f"--set {assignment}: no node {node_id!r} in the workflow (ids: {', '.join(graph)})")
    inputs = graph[node_id]["inputs"]
    if name not in inputs:
        raise WorkflowError(f"--set {assignment}: node {node_id} ({graph[node_id]['class_type']}) has no input "
                            f"{name!r}; its inputs: {', '.join(inputs)}")
    if isinstance(inputs[name], str):
        inputs[name] = raw
        return
    try:
        inputs[name] = json.loads(raw)
    except json.JSONDecodeError:
        raise WorkflowError(f"--set {assignment}: {raw!r} is not a valid value for {name} "
                            f"(currently {inputs[name]!r})") from None


def preview_saver(folder: str):
    """An ``on_preview`` that writes each frame to ``folder`` as ``preview_<node>_<n>.jpg`` (or .png)."""
    os.makedirs(folder, exist_ok=True)
    count = [0]

    def save(node, image_type, image: bytes) -> None:
        count[0] += 1
        suffix = ".png" if image_type == "image/png" else ".jpg"
        with open(os.path.join(folder, f"preview_{node}_{count[0]:04d}{suffix}"), "wb") as f:
            f.write(image)
    return save


def run(server: str, graph: dict, out_dir: str, on_event=print, on_preview=None) -> list[str]:
    server = check_server_url(server)
    client_id = uuid.uuid4().hex
    prompt_id = submit(server, graph, client_id)
    on_event(f"queued as {prompt_id}")
    return save_outputs(server, follow(server, prompt_id, client_id, on_event, on_preview=on_preview), out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", help="API-format workflow JSON (ComfyUI: Export (API))")
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--previews", metavar="DIR", help="save the live preview frames there")
    args = parser.parse_args(argv)
    try:
        check_server_url(args.server)
        for option, folder in (("--out", args.out), ("--previews", args.previews)):
            if folder and os.path.exists(folder) and not os.path.isdir(folder):
                raise WorkflowError(f"{option} {folder} is a file: give a folder for the images (it is created).")
        graph = load_workflow(args.workflow)
        for assignment in args.set:
            set_input(graph, assignment)
        on_preview = preview_saver(args.previews) if args.previews else None
        for path in run(args.server, graph, args.out, on_preview=on_preview):
            print(f"saved {path}")
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: stopped by the user (the server keeps running the workflow; press Cancel in ComfyUI to stop "
              "it).", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
