"""The HTML report in a real browser (headless Debian chromium over the DevTools protocol).

Renders report.html built from a run that contains hostile documents and names, and checks, in
the browser: no console errors or exceptions, no network requests beyond the file itself and its
inline data: images, and that none of the injected payloads ran. A control page with the same
payload left unescaped proves the detector notices execution. No skip: without chromium this fails.
"""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

from browser import render
from report_fixtures import make_run

from attribution.report import build_report

PROBE = """JSON.stringify({
  pwned: window.__pwned === undefined ? null : window.__pwned,
  scripts: document.querySelectorAll('script').length,
  handlers: Array.from(document.querySelectorAll('*')).filter(
      e => Array.from(e.attributes).some(a => a.name.toLowerCase().startsWith('on'))).length,
  jsLinks: Array.from(document.querySelectorAll('[href],[src]')).filter(
      e => /^\\s*javascript:/i.test(e.getAttribute('href') || e.getAttribute('src') || '')).length,
  frames: document.querySelectorAll('iframe,object,embed,link').length,
  images: Array.from(document.images).map(i => i.src.slice(0, 22)),
  loadedImages: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
  text: document.body.innerText
})"""


def test_report_renders_safely_in_chromium(tmp_path):
    run = make_run(tmp_path / "run", seed=0)
    out = tmp_path / "report"
    build_report(run, out, pool=100, currency="USD", semantic=False, n_boot=20)
    res = render(out / "report.html", PROBE)
    probe = json.loads(res.value)

    shot = tmp_path / "report.png"
    shot.write_bytes(res.screenshot)
    keep = os.environ.get("ATTRIBUTION_SCREENSHOT")  # e.g. to attach the screenshot to a review
    if keep:
        shutil.copy(shot, keep)
    assert res.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(res.screenshot) > 50_000

    assert res.errors == []
    assert res.remote_requests == []
    assert probe["pwned"] is None
    assert probe["scripts"] == 0 and probe["handlers"] == 0 and probe["jsLinks"] == 0 and probe["frames"] == 0
    assert probe["images"] == ["data:image/png;base64,"] * 3 and probe["loadedImages"] == 3
    # The payloads are on the page as visible text.
    assert "<script>window.__pwned=1</script>" in probe["text"]
    assert '<img src=x onerror="window.__pwned=1">' in probe["text"]
    assert "javascript:window.__pwned=1" in probe["text"]
    assert "positive-share" in probe["text"]


def test_detector_sees_an_unescaped_payload(tmp_path):
    page = tmp_path / "control.html"
    page.write_text(
        '<!DOCTYPE html><html><body><p>control</p><img src=x onerror="window.__pwned=1">'
        '<img src="http://evil.example/pixel.png"></body></html>'
    )
    res = render(Path(page), "JSON.stringify({pwned: window.__pwned === undefined ? null : window.__pwned})")
    assert json.loads(res.value)["pwned"] == 1
    assert any(u.startswith("http://evil.example/") for u in res.remote_requests)


def test_dump_dom_and_screenshot_flags(tmp_path):
    """A second, simpler check with chromium's own flags: the DOM after load has no live payloads."""
    import subprocess

    from browser import CHROMIUM

    run = make_run(tmp_path / "run", seed=1)
    out = tmp_path / "report"
    build_report(run, out, semantic=False, n_boot=20)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'p'}",
    ]
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "<h1>Training-data contribution and royalty report" in dom
    tags: list[tuple[str, list]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, attrs))

    Collect().feed(dom)
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed", "link", "a")]
    assert not [(t, a) for t, attrs in tags for a, _ in attrs if a.startswith("on")]
    assert [v[:22] for t, attrs in tags if t == "img" for a, v in attrs if a == "src"] == [
        "data:image/png;base64,"
    ] * 3
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in dom
    subprocess.run(
        [CHROMIUM, *flags, "--screenshot", "--window-size=1280,2000", url],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert (tmp_path / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
