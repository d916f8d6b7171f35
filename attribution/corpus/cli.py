"""`attribution corpus ...`: build the built-in corpus, count a corpus, tokenize it into the cache."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from attribution.tokens import SequenceSet

ON_BAD_LINE = click.option(
    "--on-bad-line",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="What to do with a bad record (invalid JSON or UTF-8, no text, empty text, duplicate id, "
    "truncated file): 'error' stops with `error: FILE:LINE: reason` and exit status 2; 'skip' counts "
    "it, reports the count, and goes on.",
)
OWNER_MAP = click.option(
    "--owner-map",
    type=click.Path(dir_okay=False),
    default=None,
    help="A .toml or .csv file mapping sources or id patterns to rights holders (see corpora/README.md); "
    "it overrides the owner a document carries.",
)


def _paths(specs: tuple[str, ...]) -> list[Path]:
    from attribution.corpus.builtin import resolve_corpus

    return [p for spec in specs for p in resolve_corpus(spec)]


def _report_skips(stats) -> None:
    click.echo(stats.summary(), err=True)
    for example in stats.examples:
        click.echo(f"  skipped {example}", err=True)


@click.group("corpus")
def corpus() -> None:
    """Build, inspect and tokenize training corpora.

    A corpus is one or more paths: Pile shards (.jsonl, .jsonl.zst), a folder of shards, a folder of
    text files (source = sub-folder), CSV/Parquet with `text` and `source` columns, `hf:NAME[:split]`
    (needs `datasets`), or `builtin[:N_DOCS[:SEED]]` (built once into the cache).
    """


@corpus.command("build")
@click.argument("name", type=click.Choice(["builtin"]))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write the shards into."
)
@click.option(
    "--n-docs", default=3000, show_default=True, help="Number of documents (spread evenly over sources)."
)
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed gives the same corpus.")
def build_cmd(name: str, out: str, n_docs: int, seed: int) -> None:
    """Build the built-in multi-source corpus from real text shipped by installed packages.

    Seven Pile-like sources (code, encyclopedia, news, books, legal, documentation, math), each
    document with its source, rights holder and license, written as Pile-format .jsonl.zst shards
    that `attribution run --corpus DIR` reads back.
    """
    from attribution.corpus.builtin import build

    manifest = build(out, n_docs=n_docs, seed=seed)
    click.echo(f"{'source':<12} {'docs':>6} {'chars':>10}")
    for source, row in manifest["sources"].items():
        click.echo(f"{source:<12} {row['docs']:>6} {row['chars']:>10}")
    click.echo(
        f"{'total':<12} {manifest['n_docs']:>6} {sum(r['chars'] for r in manifest['sources'].values()):>10}"
    )
    click.echo(f"wrote {len(manifest['shards'])} shard(s) to {out}")


@corpus.command("stats")
@click.argument("paths", nargs=-1, required=True)
@ON_BAD_LINE
@OWNER_MAP
@click.option("--no-tokens", is_flag=True, help="Count documents and characters only (skips tokenizing).")
def stats_cmd(paths: tuple[str, ...], on_bad_line: str, owner_map: str | None, no_tokens: bool) -> None:
    """Print documents, GPT-2 tokens and characters per source (and the owners in each source).

    Reads the corpus exactly as training would, so it is also the way to check a corpus for bad
    records before a run.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from attribution.corpus.owners import load_owner_map
    from attribution.corpus.readers import ReadStats, read_corpus
    from attribution.tokens import encode_texts

    stats = ReadStats()
    owners = load_owner_map(owner_map) if owner_map else None
    docs_n: Counter = Counter()
    tokens: Counter = Counter()
    chars: Counter = Counter()
    owner_sets: dict[str, set[str]] = {}
    batch: list = []

    def flush() -> None:
        if not no_tokens:
            for doc, ids in zip(batch, encode_texts([d.text for d in batch]), strict=True):
                tokens[doc.source] += len(ids)
        batch.clear()

    for doc in read_corpus(_paths(paths), on_bad_line=on_bad_line, owner_map=owners, stats=stats):  # type: ignore[arg-type]
        docs_n[doc.source] += 1
        chars[doc.source] += len(doc.text)
        owner_sets.setdefault(doc.source, set()).add(doc.owner)
        batch.append(doc)
        if len(batch) >= 512:
            flush()
    flush()
    click.echo(f"{'source':<16} {'docs':>8} {'tokens':>11} {'chars':>12} {'owners':>7}")
    for source in sorted(docs_n):
        tok = "-" if no_tokens else str(tokens[source])
        click.echo(
            f"{source:<16} {docs_n[source]:>8} {tok:>11} {chars[source]:>12} {len(owner_sets[source]):>7}"
        )
    total_tok = "-" if no_tokens else str(sum(tokens.values()))
    click.echo(f"{'total':<16} {sum(docs_n.values()):>8} {total_tok:>11} {sum(chars.values()):>12}")
    _report_skips(stats)


@corpus.command("tokenize")
@click.argument("paths", nargs=-1, required=True)
@click.option("--seq-len", default=256, show_default=True, help="Tokens per training sequence.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Token cache folder [default: $ATTRIBUTION_CACHE/tokens or ~/.cache/attribution/tokens].",
)
@click.option("--max-docs", type=int, default=None, help="Keep only the first N documents.")
@ON_BAD_LINE
@OWNER_MAP
def tokenize_cmd(
    paths: tuple[str, ...],
    seq_len: int,
    cache_dir: str | None,
    max_docs: int | None,
    on_bad_line: str,
    owner_map: str | None,
) -> None:
    """Tokenize a corpus into fixed-length GPT-2 sequences and cache them on disk.

    The cache is keyed by the corpus's content fingerprint, the tokenizer and --seq-len, so `attribution
    run` on the same corpus loads it instead of tokenizing again. A bad record (with --on-bad-line
    error) leaves no partial cache behind.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from attribution.corpus.readers import ReadStats

    stats = ReadStats()
    seqs = corpus_sequences(
        paths,
        seq_len,
        cache_dir=cache_dir,
        on_bad_line=on_bad_line,
        owner_map=owner_map,
        max_docs=max_docs,
        stats=stats,
    )
    click.echo(f"{len(seqs.docs)} documents, {len(seqs)} sequences of {seq_len}, {seqs.n_tokens} tokens")
    click.echo(f"cache: {seqs.path}")
    if stats.files:
        _report_skips(stats)


def corpus_sequences(
    specs: Iterable[str | os.PathLike],
    seq_len: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    on_bad_line: str = "error",
    owner_map: str | os.PathLike | None = None,
    max_docs: int | None = None,
    stats=None,
) -> SequenceSet:
    """From `--corpus` values to cached sequences in one call (`attribution corpus tokenize`).

    It lives with the command, not in `attribution.tokens`, so that tokens depend on the corpus and never
    the other way round (only this command-line module sees both).

    `specs` are paths, `builtin[:N[:SEED]]` or `hf:NAME[:split]`; the cache defaults to
    `$ATTRIBUTION_CACHE/tokens` (or ~/.cache/attribution/tokens). The owner map keys the cache, since
    owners are stored in it; skipping bad lines does not (with no bad lines both modes agree).
    """
    from attribution.corpus.builtin import cache_root, resolve_corpus
    from attribution.corpus.owners import load_owner_map
    from attribution.corpus.readers import corpus_fingerprint, read_corpus
    from attribution.tokens import build_sequences

    paths = [p for spec in specs for p in resolve_corpus(spec)]
    owners = load_owner_map(owner_map) if owner_map else None
    fingerprint = corpus_fingerprint(paths, owner_map=owners)
    docs = read_corpus(paths, on_bad_line=on_bad_line, owner_map=owners, stats=stats)  # type: ignore[arg-type]
    return build_sequences(
        docs,
        seq_len,
        Path(cache_dir) if cache_dir else cache_root() / "tokens",
        fingerprint,
        max_docs=max_docs,
    )


commands = [corpus]
