"""Bad input, at the command line: one `error: FILE:LINE: reason` line and exit 2, or skip and count.

Each case of the issue's list has a test: empty text, invalid UTF-8, missing `text`, a JSON array
or bare string, invalid JSON, duplicate ids, a truncated .zst, a 50 MB document, a 0-byte file, a
path that does not exist. Failing runs must leave no partial token cache and no partial corpus.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from attribution.cli import main
from attribution.corpus import ReadStats, read_corpus

GOOD = b'{"text": "a good document", "meta": {"pile_set_name": "web"}}\n'
GOOD2 = b'{"text": "another good one", "meta": {"pile_set_name": "web"}}\n'

# name -> (bytes of line 2 in a 3-line shard, expected reason)
BAD_LINES = {
    "empty_text": (b'{"text": "   ", "meta": {}}', "empty text"),
    "invalid_utf8": (b'{"text": "caf\xe9 \xff"}', "invalid UTF-8 at column 14"),
    "missing_text": (b'{"body": "no text field"}', "missing 'text' field"),
    "json_array": (b'["a", "list"]', "expected a JSON object, got an array"),
    "bare_string": (b'"just a string"', "expected a JSON object, got a string"),
    "invalid_json": (b'{"text": "unterminated', "invalid JSON at column 10: Unterminated string"),
    "duplicate_id": (b'{"text": "copy", "id": "same"}', "duplicate id 'same'"),
}


def _shard(tmp_path: Path, middle: bytes) -> Path:
    first = b'{"text": "first", "id": "same"}\n'
    path = tmp_path / "shard.jsonl"
    path.write_bytes(first + middle + b"\n" + GOOD2)
    return path


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_errors_then_skips(tmp_path, case):
    middle, reason = BAD_LINES[case]
    shard = _shard(tmp_path, middle)
    cache = tmp_path / "cache"
    result = _run("corpus", "tokenize", shard, "--seq-len", "8", "--cache-dir", cache)
    _one_error_line(result, f"error: {shard}:2: {reason}")
    assert not cache.exists() or not any(cache.iterdir()), "a failed tokenize left a partial cache"

    result = _run(
        "corpus", "tokenize", shard, "--seq-len", "8", "--cache-dir", cache, "--on-bad-line", "skip"
    )
    assert result.exit_code == 0, result.output
    assert "2 documents" in result.stdout
    assert "skipped 1 bad record" in result.stderr and f"{shard}:2:" in result.stderr
    assert [p.name.startswith("seq-") for p in cache.iterdir()] == [True]


def test_truncated_zst(tmp_path):
    lines = [
        json.dumps({"text": f"document {i} says {i * 7919 % 104729}", "id": f"d{i}"}) for i in range(40_000)
    ]
    whole = zstandard.ZstdCompressor().compress("\n".join(lines).encode() + b"\n")
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    cache = tmp_path / "cache"
    result = _run("corpus", "tokenize", path, "--seq-len", "8", "--cache-dir", cache)
    _one_error_line(result, f"{path}:")
    assert "truncated zstd stream" in result.stderr
    assert not cache.exists() or not any(cache.iterdir())
    stats = ReadStats()
    docs = list(read_corpus([path], on_bad_line="skip", stats=stats))
    assert 0 < len(docs) < 40_000 and stats.skipped == {"truncated zstd stream": 1}
    # what was read is whole documents only: the cut-off last line is not emitted
    assert [d.text for d in docs] == [json.loads(line)["text"] for line in lines[: len(docs)]]


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD)
    _one_error_line(_run("corpus", "stats", empty, "--no-tokens"), f"error: {empty}: empty file (0 bytes)")
    result = _run("corpus", "stats", empty, good, "--no-tokens", "--on-bad-line", "skip")
    assert result.exit_code == 0 and "skipped 1 bad record(s) (empty file: 1)" in result.stderr


def test_missing_path_is_an_error_even_when_skipping(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for extra in ([], ["--on-bad-line", "skip"]):
        _one_error_line(
            _run("corpus", "stats", missing, *extra), f"error: {missing}: no such file or directory"
        )


def test_fifty_megabyte_document(tmp_path):
    """One 50 MB line is read whole (no line-length limit) and kept as one document."""
    text = ("All the world's a stage, and all the men and women merely players. " * 760_000)[:50_000_000]
    path = tmp_path / "big.jsonl"
    path.write_bytes(json.dumps({"text": text, "id": "big"}).encode() + b"\n" + GOOD)
    docs = list(read_corpus([path]))
    assert [d.doc_id for d in docs][0] == "big" and len(docs[0].text) == 50_000_000 and len(docs) == 2
    result = _run("corpus", "stats", path, "--no-tokens")
    assert result.exit_code == 0 and "50000015" in result.stdout  # 50 MB + len("a good document")


def test_exit_status_and_single_line_in_a_real_process(tmp_path):
    shard = _shard(tmp_path, BAD_LINES["invalid_json"][0])
    proc = subprocess.run(
        [sys.executable, "-m", "attribution.cli", "corpus", "stats", str(shard)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {shard}:2: invalid JSON at column 10: Unterminated string starting at"
    ]


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    from attribution.corpus import builtin

    def broken(rng):
        yield from ()
        raise RuntimeError("source failed")

    monkeypatch.setitem(builtin.SOURCES, "github", broken)
    out = tmp_path / "corpus"
    with pytest.raises(RuntimeError):
        builtin.build(out, n_docs=20)
    assert list(tmp_path.iterdir()) == []
