"""Rewriters: who turns an original into a paraphrase. Offline by default; an LLM as a plug-in.

No generative model installs offline, so a real LLM rewrite is something the user supplies:

- `cmd:"COMMAND"`: the text goes to the command's stdin, the rewrite comes back on stdout. The kind
  of rewrite is in `$ATTRIBUTION_REWRITE_KIND` (and replaces `{kind}` in the command).
- `http:URL`: an OpenAI-compatible chat-completions endpoint; the API key is read from an
  environment variable (never from the command line, so it stays out of shell history and logs).

Both have a timeout and retries, and successful rewrites are cached on disk (keyed by rewriter,
kind, seed and text), so rerunning an experiment costs nothing. A rewriter that fails, hangs or
returns empty text raises `RewriteError`; `with_fallback` turns that into the offline rewrite and
records why. No path returns empty text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from attribution.errors import UserError
from attribution.io import atomic_write

KINDS = ("paraphrase", "significant")

PROMPTS = {
    "paraphrase": (
        "Paraphrase the user's text sentence by sentence. Keep every fact and the order of ideas, "
        "but use different words and sentence structure wherever possible. Reply with the paraphrase only."
    ),
    "significant": (
        "Rewrite the user's text so that it looks much less like the original: condense it, drop minor "
        "details, reorder the points and use entirely different wording, while keeping its main subject "
        "and claims. Reply with the rewrite only."
    ),
}


class RewriteError(UserError):
    """A rewriter did not produce a usable rewrite (failed, timed out, or returned nothing)."""


@dataclass(frozen=True)
class Rewrite:
    text: str
    rewriter: str  # which rewriter produced the text
    fallback_reason: str | None = None


class Rewriter(Protocol):
    name: str

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite: ...


def _checked(text: str | None, who: str) -> str:
    if text is None or not text.strip():
        raise RewriteError(f"rewriter {who} returned empty text")
    return text.strip()


class OfflineRewriter:
    """The built-in thesaurus paraphraser (see `attribution.variants.paraphrase`)."""

    name = "offline"

    def __init__(self) -> None:
        self._paraphraser = None

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        if self._paraphraser is None:
            from attribution.variants.paraphrase import Paraphraser

            self._paraphraser = Paraphraser()
        fn = self._paraphraser.paraphrase if kind == "paraphrase" else self._paraphraser.significant
        out = fn(text, seed)
        if not out.strip():  # e.g. a text with no sentences at all: keep it rather than emit nothing
            out = text
        return Rewrite(_checked(out, self.name), self.name)


class CommandRewriter:
    """Runs a user command per text: stdin = original, stdout = rewrite."""

    def __init__(self, command: str, *, timeout: float = 120.0, retries: int = 1):
        if not command.strip():
            raise UserError('--rewriter cmd: needs a command, e.g. cmd:"llm -m mymodel"')
        self.command = command
        self.name = f"cmd:{command}"
        self.timeout = timeout
        self.retries = retries

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        argv = shlex.split(self.command.replace("{kind}", kind))
        env = dict(
            os.environ,
            ATTRIBUTION_REWRITE_KIND=kind,
            ATTRIBUTION_REWRITE_SEED=str(seed),
            ATTRIBUTION_REWRITE_PROMPT=PROMPTS[kind],
        )
        last = ""
        for attempt in range(self.retries + 1):
            try:
                proc = subprocess.run(
                    argv,
                    input=text,
                    capture_output=True,
                    text=True,
                    timeout=self.timeout,
                    env=env,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                last = f"timed out after {self.timeout:g} s"
            except OSError as exc:
                raise RewriteError(f"rewriter {self.name}: cannot run it: {exc}") from exc
            else:
                if proc.returncode == 0 and proc.stdout.strip():
                    return Rewrite(proc.stdout.strip(), self.name)
                err = proc.stderr.strip().splitlines()[-1:] or [""]
                last = (
                    f"exit status {proc.returncode} {err[0]}".strip()
                    if proc.returncode
                    else "returned empty text"
                )
            if attempt < self.retries:
                time.sleep(min(2.0**attempt * 0.5, 10.0))
        raise RewriteError(f"rewriter {self.name}: {last} (after {self.retries + 1} attempts)")


class HttpRewriter:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama ...)."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "gpt-4o-mini",
        key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 2,
        temperature: float = 0.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--rewriter http: needs a URL starting with http:// or https://, got {url!r}")
        self.url = (
            url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        )
        self.name = f"http:{self.url}#{model}"
        self.model = model
        self.key_env = key_env
        self.timeout = timeout
        self.retries = retries
        self.temperature = temperature

    def _request(self, text: str, kind: str, seed: int) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": PROMPTS[kind]}, {"role": "user", "content": text}],
            "temperature": self.temperature,
            "seed": seed,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        last = ""
        for attempt in range(self.retries + 1):
            retry = True
            try:
                with urllib.request.urlopen(self._request(text, kind, seed), timeout=self.timeout) as resp:
                    payload = json.loads(resp.read(10_000_000))
                content = payload["choices"][0]["message"]["content"]
                if isinstance(content, str) and content.strip():
                    return Rewrite(content.strip(), self.name)
                last = "returned empty text"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                retry = exc.code == 429 or exc.code >= 500
                if exc.code in (401, 403):
                    last += f" (is ${self.key_env} set to a valid key?)"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = f"no answer: {getattr(exc, 'reason', exc)}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"not an OpenAI-style chat completion: {exc!r}"
            if not retry:
                break
            if attempt < self.retries:
                time.sleep(min(2.0**attempt * 0.5, 10.0))
        raise RewriteError(f"rewriter {self.name}: {last}")


class CachedRewriter:
    """Remembers successful rewrites on disk; failures are never cached, so they are retried next time."""

    def __init__(self, inner: Rewriter, cache_dir: Path):
        self.inner = inner
        self.name = inner.name
        self.cache_dir = Path(cache_dir)

    def _path(self, text: str, kind: str, seed: int) -> Path:
        key = hashlib.sha256(json.dumps([self.inner.name, kind, seed, text]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        path = self._path(text, kind, seed)
        if path.is_file():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("text", "").strip():
                    return Rewrite(cached["text"], cached.get("rewriter", self.name))
            except (OSError, ValueError):
                pass  # unreadable cache entry: redo it
        result = self.inner.rewrite(text, kind, seed)
        _checked(result.text, self.name)
        try:
            with atomic_write(path) as fh:
                json.dump({"text": result.text, "rewriter": result.rewriter, "kind": kind, "seed": seed}, fh)
        except OSError:
            pass  # a read-only cache costs only time
        return result


class FallbackRewriter:
    """Tries the primary rewriter; on `RewriteError` uses the fallback and records the reason."""

    def __init__(self, primary: Rewriter, fallback: Rewriter):
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name

    def rewrite(self, text: str, kind: str, seed: int) -> Rewrite:
        try:
            return self.primary.rewrite(text, kind, seed)
        except RewriteError as exc:
            print(f"warning: {exc}; using the {self.fallback.name} rewriter instead", file=sys.stderr)
            out = self.fallback.rewrite(text, kind, seed)
            return Rewrite(out.text, out.rewriter, fallback_reason=str(exc))


def default_cache_dir() -> Path:
    base = os.environ.get("ATTRIBUTION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attribution"
    )
    return Path(base) / "rewrites"


def make_rewriter(
    spec: str | None,
    *,
    timeout: float = 120.0,
    retries: int = 2,
    on_failure: str = "error",
    model: str = "gpt-4o-mini",
    key_env: str = "OPENAI_API_KEY",
    cache_dir: Path | None = None,
) -> Rewriter:
    """Build a rewriter from a `--rewriter` spec: `offline` (default), `cmd:COMMAND` or `http:URL`.

    `on_failure="fallback"` makes a failing plug-in fall back to the offline rewriter; `"error"` stops.
    """
    if on_failure not in ("error", "fallback"):
        raise UserError(f"on_failure must be 'error' or 'fallback', not {on_failure!r}")
    if spec is None or spec.strip() in ("", "offline"):
        return OfflineRewriter()
    spec = spec.strip()
    plugin: Rewriter
    if spec.startswith("cmd:"):
        plugin = CommandRewriter(spec[4:], timeout=timeout, retries=retries)
    elif spec.startswith(("http://", "https://")):
        plugin = HttpRewriter(spec, model=model, key_env=key_env, timeout=timeout, retries=retries)
    elif spec.startswith("http:"):
        plugin = HttpRewriter(spec[5:], model=model, key_env=key_env, timeout=timeout, retries=retries)
    else:
        raise UserError(f'unknown --rewriter {spec!r}: use offline, cmd:"COMMAND" or http:URL')
    plugin = CachedRewriter(plugin, cache_dir or default_cache_dir())
    return FallbackRewriter(plugin, OfflineRewriter()) if on_failure == "fallback" else plugin
