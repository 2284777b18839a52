"""The web page in headless Chromium (the Debian ``chromium`` package), driven over the Chrome
DevTools protocol: type a prompt, pick the topic and methods, press Generate, wait for both
outputs, check the tokens in the DOM against the API, take a screenshot. Then the same with
streaming on. Skips when /usr/bin/chromium is absent."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_serve import start_service

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "My heart is broken, so I should"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    yield from start_service(tmp_path_factory.getbasetemp())


class DevTools:
    """A minimal Chrome DevTools protocol client for one page."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout}s for {expression}")

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile, driven through :class:`DevTools` on its first page."""
    proc = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip("headless browser test needs /usr/bin/chromium (Debian package 'chromium')")
    pytest.importorskip("websockets.sync.client", reason="the DevTools driver needs the websockets package")


@pytest.fixture(scope="module")
def browser(url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as tools:
        yield tools


READ_OUTPUTS = """
[...document.querySelectorAll('#outputs .output')].map(box => ({
  method: box.dataset.method,
  done: box.dataset.done === '1',
  tokens: [...box.querySelectorAll('.tok')].map(s => s.textContent),
  coloured: [...box.querySelectorAll('.tok')].filter(s => s.dataset.c !== undefined).length,
}))
"""


def _submit(tools: DevTools, url: str, stream: bool) -> list[dict[str, Any]]:
    tools.call("Page.navigate", url=f"{url}/")
    tools.wait_for("document.readyState === 'complete' && document.querySelector('#topic').options.length > 1")
    tools.js("document.querySelector('#prompt').focus(); document.querySelector('#prompt').select()")
    tools.call("Input.insertText", text=PROMPT)
    tools.js(
        f"""(() => {{
        const topic = document.querySelector('#topic');
        topic.value = 'medical'; topic.dispatchEvent(new Event('change'));
        document.querySelectorAll('#methods input').forEach(el => {{ el.checked = el.value === 'swap'; }});
        document.querySelector('#max-new-tokens').value = '6';
        document.querySelector('#seed').value = '3';
        document.querySelector('#stream').checked = {json.dumps(stream)};
        document.querySelector('#run').click();
    }})()"""
    )
    state = tools.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", timeout=120
    )
    assert state == "done", tools.js("document.querySelector('#status').textContent")
    return list(tools.js(READ_OUTPUTS))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_page_submits_a_prompt_and_shows_both_outputs(
    url: str, browser: DevTools, tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = {"prompt": PROMPT, "topic": "medical", "methods": ["swap"], "max_new_tokens": 6, "seed": 3}
    expected = httpx.post(f"{url}/compare", json=body, timeout=120).json()["results"]

    outputs = _submit(browser, url, stream=False)
    assert [o["method"] for o in outputs] == ["orig", "swap"]
    for out, res in zip(outputs, expected, strict=True):
        assert out["done"] and out["tokens"] == res["tokens"]
        assert out["coloured"] == len(res["tokens"])  # every token coloured by its contamination
    top_rows = browser.js("document.querySelectorAll('#top-latents tbody tr').length")
    assert top_rows > 0

    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    path = tmp_path_factory.mktemp("screenshots") / "page.png"
    path.write_bytes(shot)
    width, height = _png_size(shot)
    assert width >= 800 and height >= 600 and len(shot) > 20_000
    print(f"screenshot: {path}")

    streamed = _submit(browser, url, stream=True)
    assert [o["method"] for o in streamed] == ["orig", "swap"]
    for out, res in zip(streamed, expected, strict=True):
        assert out["done"] and out["tokens"] == res["tokens"]
