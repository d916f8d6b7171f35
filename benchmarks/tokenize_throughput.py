"""Tokenization throughput of the corpus layer, on the built-in corpus.

Measures (a) `attribution.tokens.encode_texts` alone, the multi-threaded `encode_batch` path, and
(b) `build_sequences` end to end (tokenize, chunk, write the memory-mapped cache), in tokens per
second, with the tokenizer's thread pool limited to `--threads`.

    .venv/bin/python benchmarks/tokenize_throughput.py --threads 2

Prints one JSON line; the numbers go into docs/benchmarks.md.

The wall-clock figure depends on what else runs on the machine; the per-CPU-second figure does not
(much), and times the thread count it bounds what the threads give on idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="tokenizer threads (RAYON_NUM_THREADS)")
    parser.add_argument("--n-docs", type=int, default=3000, help="documents of the built-in corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    # The thread pool is sized when tokenizers first runs, so set this before importing it.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(args.threads)

    from attribution.corpus import read_corpus, resolve_corpus
    from attribution.tokens import build_sequences, encode_texts, load_tokenizer

    paths = resolve_corpus(f"builtin:{args.n_docs}")
    docs = list(read_corpus(paths))
    texts = [d.text for d in docs]
    load_tokenizer()
    encode_texts(texts[:50])  # warm up the thread pool
    # Wall-clock rate, and the rate per CPU-second of this process (all its threads): on a shared,
    # loaded machine the second says what the code does per core when it gets the core.
    rates, cpu_rates, n_tokens = [], [], 0
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        n_tokens = sum(len(ids) for ids in encode_texts(texts))
        rates.append(n_tokens / (time.perf_counter() - start))
        cpu_rates.append(n_tokens / (time.process_time() - cpu))
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        seqs = build_sequences(iter(docs), args.seq_len, cache, f"bench-{time.time_ns()}")
        end_to_end = seqs.n_tokens / (time.perf_counter() - start)
        n_seq = len(seqs)
    print(
        json.dumps(
            {
                "threads": args.threads,
                "docs": len(docs),
                "chars": sum(map(len, texts)),
                "tokens": n_tokens,
                "encode_tokens_per_s_median": round(statistics.median(rates)),
                "encode_tokens_per_s_best": round(max(rates)),
                "encode_tokens_per_cpu_s_median": round(statistics.median(cpu_rates)),
                "build_sequences_tokens_per_s": round(end_to_end),
                "sequences": n_seq,
                "seq_len": args.seq_len,
                "cpus_visible": os.cpu_count(),
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
