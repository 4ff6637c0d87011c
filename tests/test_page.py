"""The page at / in a real headless browser (Debian's chromium-headless-shell) driven over its DevTools protocol:
a person picks an image file, submits, and sees the prediction."""
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

from components.export import export_onnx
from components.network import build
from tests.conftest import free_port, onnx_server, tiny_spec, wait_until

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium: scripts/setup.sh installs chromium-headless-shell")


class DevTools:
    def __init__(self, url: str) -> None:
        self.socket = connect(url, max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 20):
        return wait_until(lambda: self.evaluate(expression), seconds, f"timed out waiting for {expression}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    model = build(tiny_spec(("circle", "square", "cross")), 0)
    onnx_file = export_onnx(model, folder / "model.onnx", 20)
    with onnx_server(onnx_file, "shapes", folder, "--grpc-port", "0", "--providers", "cpu") as (base, _, _):
        yield base


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    process = subprocess.Popen([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                                f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def pages() -> list[dict]:
        try:
            return [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json() if t["type"] == "page"]
        except httpx.HTTPError:
            return []

    try:
        tools = DevTools(wait_until(pages, 20, "the browser opened no page")[0]["webSocketDebuggerUrl"])
        yield tools
        tools.socket.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the browser's own child processes too
        process.wait(timeout=20)


def test_upload_an_image_and_see_the_prediction(server, browser, tmp_path):
    image = tmp_path / "circle.png"
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray((((yy - 32) ** 2 + (xx - 32) ** 2 < 400) * 255).astype(np.uint8)).save(image)

    browser.call("Page.enable")
    browser.call("Page.navigate", url=server)
    browser.wait_for("document.readyState === 'complete' && document.getElementById('version') !== null")
    assert browser.evaluate("document.getElementById('provider').textContent") == "CPUExecutionProvider"

    document = browser.call("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.call("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(image)])
    browser.evaluate("document.querySelector('#upload button').click()")
    shown = browser.wait_for("document.getElementById('result').innerText")
    lines = shown.strip().splitlines()
    assert len(lines) == 3 and all(line.split(":")[0] in ("circle", "square", "cross") for line in lines)
    assert browser.evaluate("document.getElementById('result').dataset.version") == "file"

    screenshot = base64.b64decode(browser.call("Page.captureScreenshot")["data"])
    Path(tmp_path / "page.png").write_bytes(screenshot)
    assert screenshot.startswith(b"\x89PNG")


def test_uploading_a_non_image_shows_the_servers_message(server, browser, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an image")
    browser.call("Page.navigate", url=server)
    browser.wait_for("document.readyState === 'complete' && document.getElementById('file') !== null")
    document = browser.call("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.call("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(bogus)])
    browser.evaluate("document.querySelector('#upload button').click()")
    assert "not an image file" in browser.wait_for("document.getElementById('error').textContent")
