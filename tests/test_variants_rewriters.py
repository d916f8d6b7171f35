"""Rewriter plug-ins against local fakes: a real subprocess and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from attribution.variants.rewriters import (
    CachedRewriter,
    CommandRewriter,
    HttpRewriter,
    Rewrite,
    RewriteError,
    make_rewriter,
)

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day."


class Offline:
    """Stands in for the thesaurus rewriter where only the fallback wiring is under test."""

    name = "offline"

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        return Rewrite(f"offline {kind}: {text}", self.name)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake_llm.py"
    path.write_text("import os, sys, time\n" + body)
    return f"{sys.executable} {path}"


def test_command_rewriter_gets_text_on_stdin_and_kind_in_env(tmp_path):
    cmd = _script(
        tmp_path,
        "text = sys.stdin.read()\nprint(os.environ['ATTRIBUTION_REWRITE_KIND'].upper() + ': ' + text[::-1])\n",
    )
    out = CommandRewriter(cmd, timeout=20).rewrite(TEXT, "significant", 3)
    assert out.text == "SIGNIFICANT: " + TEXT[::-1]
    assert out.rewriter.startswith("cmd:")


def test_command_rewriter_errors_clearly_on_failure_empty_and_hang(tmp_path):
    failing = _script(tmp_path, "sys.stderr.write('model not loaded\\n'); sys.exit(3)\n")
    with pytest.raises(RewriteError, match="exit status 3 model not loaded"):
        CommandRewriter(failing, timeout=20, retries=0).rewrite(TEXT, "paraphrase", 0)
    empty = _script(tmp_path, "sys.stdin.read(); print('   ')\n")
    with pytest.raises(RewriteError, match="empty text"):
        CommandRewriter(empty, timeout=20, retries=1).rewrite(TEXT, "paraphrase", 0)
    hang = _script(tmp_path, "time.sleep(30)\n")
    t0 = time.monotonic()
    with pytest.raises(RewriteError, match="timed out after 0.5 s"):
        CommandRewriter(hang, timeout=0.5, retries=0).rewrite(TEXT, "paraphrase", 0)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RewriteError, match="cannot run it"):
        CommandRewriter("/nonexistent/llm-binary", timeout=5).rewrite(TEXT, "paraphrase", 0)


def test_command_rewriter_retries_until_success(tmp_path):
    counter = tmp_path / "count"
    cmd = _script(
        tmp_path,
        f"""
p = {str(counter)!r}
n = int(open(p).read()) if os.path.exists(p) else 0
open(p, 'w').write(str(n + 1))
if n < 2:
    sys.exit(1)
print('third time lucky: ' + sys.stdin.read())
""",
    )
    out = CommandRewriter(cmd, timeout=20, retries=2).rewrite(TEXT, "paraphrase", 0)
    assert out.text.startswith("third time lucky")
    assert counter.read_text() == "3"


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-style /v1/chat/completions endpoint with scripted behaviours."""

    mode = "ok"
    requests: list[dict] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):  # noqa: N802 (http.server API)
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        mode = type(self).mode
        if mode == "flaky" and len(type(self).requests) < 3:
            self.send_response(503)
            self.end_headers()
            return
        if mode == "unauthorized":
            self.send_response(401)
            self.end_headers()
            return
        if mode == "hang":
            time.sleep(3)
        content = "" if mode == "empty" else "REWRITTEN " + body["messages"][-1]["content"].upper()
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


@pytest.fixture()
def fake_server():
    _FakeChat.mode = "ok"
    _FakeChat.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_rewriter_speaks_openai_chat_and_sends_key_from_env(fake_server, monkeypatch):
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test-123")
    rw = HttpRewriter(fake_server, model="tiny", key_env="FAKE_LLM_KEY", timeout=10, retries=0)
    out = rw.rewrite(TEXT, "paraphrase", 7)
    assert out.text == "REWRITTEN " + TEXT.upper()
    req = _FakeChat.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test-123"
    assert req["body"]["model"] == "tiny" and req["body"]["seed"] == 7
    assert (
        req["body"]["messages"][0]["role"] == "system"
        and "Paraphrase" in req["body"]["messages"][0]["content"]
    )


def test_http_rewriter_retries_server_errors_and_reports_failures(fake_server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    _FakeChat.mode = "flaky"
    out = HttpRewriter(fake_server, key_env="NO_SUCH_KEY", timeout=10, retries=2).rewrite(
        TEXT, "significant", 0
    )
    assert out.text.startswith("REWRITTEN")
    assert len(_FakeChat.requests) == 3 and _FakeChat.requests[-1]["auth"] is None

    _FakeChat.mode, _FakeChat.requests = "unauthorized", []
    with pytest.raises(RewriteError, match=r"HTTP 401 .*NO_SUCH_KEY"):
        HttpRewriter(fake_server, key_env="NO_SUCH_KEY", timeout=10, retries=3).rewrite(TEXT, "paraphrase", 0)
    assert len(_FakeChat.requests) == 1  # a 401 is not retried

    _FakeChat.mode = "empty"
    with pytest.raises(RewriteError, match="empty text"):
        HttpRewriter(fake_server, timeout=10, retries=0).rewrite(TEXT, "paraphrase", 0)

    _FakeChat.mode = "hang"
    t0 = time.monotonic()
    with pytest.raises(RewriteError, match="no answer"):
        HttpRewriter(fake_server, timeout=0.5, retries=0).rewrite(TEXT, "paraphrase", 0)
    assert time.monotonic() - t0 < 3


def test_http_rewriter_unreachable_port_is_a_clear_error():
    with pytest.raises(RewriteError, match="no answer"):
        HttpRewriter("http://127.0.0.1:9/v1", timeout=2, retries=0).rewrite(TEXT, "paraphrase", 0)


def test_cache_serves_repeats_and_never_stores_failures(fake_server, tmp_path):
    cached = CachedRewriter(HttpRewriter(fake_server, timeout=10, retries=0), tmp_path / "cache")
    first = cached.rewrite(TEXT, "paraphrase", 0)
    assert len(_FakeChat.requests) == 1
    again = cached.rewrite(TEXT, "paraphrase", 0)
    assert again.text == first.text and len(_FakeChat.requests) == 1  # served from disk
    cached.rewrite(TEXT, "significant", 0)
    assert len(_FakeChat.requests) == 2  # another kind is another key
    _FakeChat.mode = "empty"
    with pytest.raises(RewriteError):
        cached.rewrite("Another text entirely.", "paraphrase", 0)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2


def test_make_rewriter_fallback_or_error_as_configured(tmp_path, monkeypatch):
    import attribution.variants.rewriters as rw_mod

    monkeypatch.setattr(rw_mod, "OfflineRewriter", Offline)
    failing = _script(tmp_path, "sys.exit(1)\n")
    strict = make_rewriter(f"cmd:{failing}", retries=0, timeout=20, cache_dir=tmp_path / "c")
    with pytest.raises(RewriteError):
        strict.rewrite(TEXT, "paraphrase", 0)
    lenient = make_rewriter(
        f"cmd:{failing}", retries=0, timeout=20, on_failure="fallback", cache_dir=tmp_path / "c"
    )
    out = lenient.rewrite(TEXT, "paraphrase", 0)
    assert out.text == f"offline paraphrase: {TEXT}" and out.rewriter == "offline"
    assert "exit status 1" in out.fallback_reason
    assert isinstance(make_rewriter(None), Offline)
    with pytest.raises(Exception, match="unknown --rewriter"):
        make_rewriter("ftp:example")
    assert make_rewriter("http:http://127.0.0.1:1/v1", cache_dir=tmp_path).name.startswith(
        "http:http://127.0.0.1:1/"
    )
