"""A minimal Chrome DevTools Protocol client for rendering a report in headless Debian chromium.

It opens one page, records console messages, uncaught exceptions, log entries and every network
request, evaluates an expression in the page, and saves a full-page screenshot. No Playwright (its
browsers cannot be downloaded here); the only dependency is `websocket-client`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]


@dataclass
class PageResult:
    console: list[dict] = field(default_factory=list)  # Runtime.consoleAPICalled params
    exceptions: list[dict] = field(default_factory=list)  # Runtime.exceptionThrown params
    log: list[dict] = field(default_factory=list)  # Log.entryAdded entries
    requests: list[str] = field(default_factory=list)  # every requested URL
    value: object = None  # result of the evaluated expression
    screenshot: bytes = b""

    @property
    def errors(self) -> list[str]:
        out = [
            f"console.{c.get('type')}: {c.get('args')}"
            for c in self.console
            if c.get("type") in ("error", "assert")
        ]
        out += [f"exception: {e.get('exceptionDetails', {}).get('text')}" for e in self.exceptions]
        out += [f"log {e.get('level')}: {e.get('text')}" for e in self.log if e.get("level") == "error"]
        return out

    @property
    def remote_requests(self) -> list[str]:
        """Requests for anything other than the file itself and inline data: URLs."""
        return [u for u in self.requests if not (u.startswith("file:") or u.startswith("data:"))]


class _Session:
    def __init__(self, ws_url: str, timeout: float):
        self.timeout = timeout
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> None:
        if any(e["method"] == method for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        self.ws.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if "method" in msg:
                self.events.append(msg)
        self.ws.settimeout(self.timeout)


def render(path: Path, expression: str, *, timeout: float = 60.0) -> PageResult:
    """Open `path` (file://) in headless chromium and return what happened there."""
    if not os.path.exists(CHROMIUM):
        raise FileNotFoundError(f"{CHROMIUM} is missing: the browser test needs Debian's chromium package")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = _devtools_port(proc, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        s = _Session(page["webSocketDebuggerUrl"], timeout)
        for domain in ("Runtime", "Log", "Network", "Page"):
            s.call(f"{domain}.enable")
        s.call("Page.navigate", url=Path(path).resolve().as_uri())
        s.wait_for("Page.loadEventFired", timeout)
        s.drain(1.0)  # late events: delayed handlers, lazy images
        res = PageResult()
        value = s.call("Runtime.evaluate", expression=expression, returnByValue=True)
        res.value = value.get("result", {}).get("value")
        metrics = s.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = s.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1},
        )
        res.screenshot = base64.b64decode(shot["data"])
        for e in s.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled":
                res.console.append(p)
            elif e["method"] == "Runtime.exceptionThrown":
                res.exceptions.append(p)
            elif e["method"] == "Log.entryAdded":
                res.log.append(p.get("entry", {}))
            elif e["method"] == "Network.requestWillBeSent":
                res.requests.append(p.get("request", {}).get("url", ""))
        s.ws.close()
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"DevTools listening on ws://[^:]+:(\d+)/")
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {proc.returncode} before DevTools started")
            continue
        m = pattern.search(line)
        if m:
            return int(m.group(1))
    raise TimeoutError("chromium did not report its DevTools port")
