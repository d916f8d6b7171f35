"""Peak memory while streaming and tokenizing a 1 GB Pile shard.

Generates a Pile-format shard of `--size-gb` (default 1 GB of JSON lines, real text from the
built-in corpus, each copy with its own id) in /tmp, then in fresh subprocesses

1. reads it through `attribution corpus stats --no-tokens` (stream only), and
2. tokenizes it into the sequence cache through `attribution corpus tokenize`,

and reports each subprocess's peak resident memory (`ru_maxrss`, exact, not sampled) and time.
The shard and the cache are deleted afterwards.

    .venv/bin/python benchmarks/stream_memory.py            # 1 GB; about 250M tokens
    .venv/bin/python benchmarks/stream_memory.py --size-gb 0.1 --zst
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs the CLI in-process and reports this process's own peak RSS, whatever the exit status.
_CHILD = """
import resource, sys
from attribution.cli import main
try:
    main(sys.argv[1:], prog_name="attribution")
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def write_shard(path: Path, size_bytes: int, compress: bool) -> tuple[int, int]:
    """Write at least `size_bytes` of JSON lines (uncompressed size); return (documents, bytes)."""
    import zstandard

    from attribution.corpus import read_corpus, resolve_corpus

    seed_docs = list(read_corpus(resolve_corpus("builtin")))
    written = n = 0
    with open(path, "wb") as raw:
        out = zstandard.ZstdCompressor(level=3).stream_writer(raw) if compress else raw
        while written < size_bytes:
            doc = seed_docs[n % len(seed_docs)]
            line = (
                json.dumps(
                    {
                        "id": f"copy{n // len(seed_docs)}/{doc.doc_id}",
                        "text": doc.text,
                        "meta": {"pile_set_name": doc.source, "owner": doc.owner},
                    }
                ).encode()
                + b"\n"
            )
            out.write(line)
            written += len(line)
            n += 1
        if compress:
            out.close()
    return n, written


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = next(
        (int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), -1
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child failed with status {proc.returncode}: {args}")
    return {"peak_rss_mb": round(peak / 1024, 1), "seconds": round(seconds, 1), "stdout": proc.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--zst", action="store_true", help="write .jsonl.zst instead of .jsonl")
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attribution-stream-", dir="/tmp"))
    try:
        shard = work / ("shard.jsonl.zst" if args.zst else "shard.jsonl")
        start = time.perf_counter()
        n_docs, n_bytes = write_shard(shard, int(args.size_gb * 1024**3), args.zst)
        gen_s = time.perf_counter() - start
        read = run_child(["corpus", "stats", str(shard), "--no-tokens"])
        tok = run_child(
            [
                "corpus",
                "tokenize",
                str(shard),
                "--seq-len",
                str(args.seq_len),
                "--cache-dir",
                str(work / "cache"),
            ]
        )
        result = {
            "shard": shard.name,
            "json_bytes": n_bytes,
            "file_bytes": shard.stat().st_size,
            "docs": n_docs,
            "generate_s": round(gen_s, 1),
            "read_only": read,
            "read_and_tokenize": tok,
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
