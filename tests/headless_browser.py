"""Headless Chromium driven over the DevTools protocol with the pack's stdlib websocket client (no Playwright).

``CHROMIUM`` (env ``GLMIMAGE_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH) is None when there is
no browser; the tests that need one skip then.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager

from glm_image_nodes.headless.client import _WebSocket

CHROMIUM = os.environ.get("GLMIMAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws: _WebSocket):
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = self.ws.receive()
            if message is not None and message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited); raises with the page's exception text."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not satisfy {expression!r} within {timeout:g} s")
            time.sleep(0.25)


@contextmanager
def browser_page(user_dir: str, width: int = 1600, height: int = 1000):
    """One headless Chromium tab; the browser is stopped on exit."""
    process = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-dev-shm-usage", f"--user-data-dir={user_dir}", "--remote-debugging-port=0",
                                f"--window-size={width},{height}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ws = None
    try:
        port_file = os.path.join(user_dir, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (os.path.isfile(port_file) and open(port_file).read().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start its DevTools server")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            target = next(t for t in json.loads(resp.read()) if t["type"] == "page")
        path = "/" + target["webSocketDebuggerUrl"].split("/", 3)[3]
        ws = _WebSocket(f"http://127.0.0.1:{port}", path, timeout=120)
        yield Page(ws)
    finally:
        if ws is not None:
            ws.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
