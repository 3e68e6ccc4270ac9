"""A real headless Chromium for tests of what a person looks at, driven over W3C WebDriver.

Debian's ``chromium`` and ``chromium-driver`` packages (installed by ``.ci/run``); the client
is a few WebDriver calls over httpx, so no browser-automation package is needed. Tests that
need it take the ``browser`` fixture; it is skipped, naming the packages, when they are
missing (and required in CI: ``CI=true`` turns the skip into a failure).

The browser only ever opens loopback URLs the test gives it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_harness import free_port

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """A WebDriver command failed: its error and message."""


class Browser:
    """One WebDriver session of a headless Chromium."""

    def __init__(self, driver_url: str, session: str, client: httpx.Client) -> None:
        self._base = f"{driver_url}/session/{session}"
        self._client = client

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self._client.request(method, self._base + path, json=body)
        data = r.json()
        value = data.get("value") if isinstance(data, dict) else None
        if r.status_code >= 400:
            err = value.get("error") if isinstance(value, dict) else r.status_code
            msg = value.get("message") if isinstance(value, dict) else r.text
            raise BrowserError(f"{method} {path}: {err}: {str(msg)[:500]}")
        return value

    def get(self, url: str) -> None:
        if not url.startswith(("http://127.0.0.1", "http://localhost")):
            raise ValueError(f"tests only browse loopback URLs, not {url!r}")
        self._call("POST", "/url", {"url": url})

    def script(self, source: str, *args: Any) -> Any:
        """Run ``source`` (a function body: ``return ...``) in the page; its JSON result."""
        return self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def find(self, css: str) -> str:
        """The first element matching ``css`` (its WebDriver id)."""
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[ELEMENT]) for e in found]

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click", {})

    def text(self, element: str) -> str:
        return str(self._call("GET", f"/element/{element}/text"))

    def wait_for(self, source: str, timeout: float = 10.0, every: float = 0.1) -> Any:
        """Run ``source`` until it returns something truthy; that value (or TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(source)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied: {source}")
            time.sleep(every)

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport at ``path``."""
        data = self._call("GET", "/screenshot")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        """Errors the page logged (the dashboard records its own in ``window.__errors``)."""
        errors = self.script("return (window.__errors || []).map(String);")
        return [str(e) for e in errors or []]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium, driver = _which(CHROMIUM), _which(DRIVER)
    if chromium is None or driver is None:
        message = "needs Debian's chromium and chromium-driver packages (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log = tmp_path / "chromedriver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([driver, f"--port={port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=60)
    session: str | None = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.get(url + "/status").json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromedriver did not start, see {log}")
            time.sleep(0.05)
        options = {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1440,1000",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                f"--user-data-dir={tmp_path / 'chromium-profile'}",
            ],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        r = client.post(url + "/session", json=caps)
        value = r.json()["value"]
        if r.status_code >= 400:
            raise RuntimeError(f"chromium did not start: {value}")
        session = str(value["sessionId"])
        yield Browser(url, session, client)
    finally:
        if session is not None:
            try:
                client.delete(f"{url}/session/{session}")
            except httpx.HTTPError:
                pass
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
