"""`attribution index build|add|info` and `attribution compare`."""

from __future__ import annotations

import json

import click


@click.group("index")
def index() -> None:
    """Lexical (MinHash), semantic (MiniLM) and BM25 indexes of a training corpus.

    \b
    An index directory answers "did the model copy this?" (n-gram overlap) and "is this about the
    same thing?" (embeddings), for `attribution compare` and the reports.
    """


_CORPUS = click.option(
    "--corpus",
    "corpus",
    multiple=True,
    required=True,
    help="Corpus path (any format `attribution corpus` reads: .jsonl[.zst], .csv, .parquet, a folder, "
    "hf:NAME, 'builtin'), or a run directory / its docs.parquet. Repeat for several.",
)
_JOBS = click.option(
    "--jobs", type=int, default=None, help="Processes for MinHash signatures (default: all cores)."
)


def _docs(specs: tuple[str, ...]):
    """Documents of the `--corpus` values: `builtin[:N]` and `hf:` resolved as everywhere else, run dirs kept."""
    from attribution.analysis.index import iter_corpus
    from attribution.corpus import resolve_corpus

    return iter_corpus([str(p) for spec in specs for p in resolve_corpus(spec)])


@index.command("build")
@_CORPUS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index directory to create.")
@click.option(
    "--ngram",
    default=8,
    show_default=True,
    help="Words per shingle (n-gram) for the lexical index and containment.",
)
@click.option(
    "--num-perm",
    default=256,
    show_default=True,
    help="MinHash values per window; the standard error of a Jaccard estimate is sqrt(J(1-J)/num-perm).",
)
@click.option(
    "--lexical-window",
    default=200,
    show_default=True,
    help="Words per lexical window (long documents are cut into windows).",
)
@click.option(
    "--lexical-kind",
    type=click.Choice(["auto", "flat", "hnsw", "ivf"]),
    default="auto",
    show_default=True,
    help="FAISS binary index: exhaustive (flat), HNSW graph or IVF; auto picks by size.",
)
@click.option(
    "--semantic-window", default=128, show_default=True, help="Words per window embedded with MiniLM."
)
@click.option(
    "--semantic-kind",
    type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]),
    default="auto",
    show_default=True,
    help="FAISS float index for embeddings; auto picks by size.",
)
@click.option("--no-semantic", is_flag=True, help="Skip the MiniLM index (it is the slow part on a CPU).")
@click.option("--no-bm25", is_flag=True, help="Skip the BM25 index.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index directory.")
@_JOBS
def build_cmd(
    corpus,
    out,
    ngram,
    num_perm,
    lexical_window,
    lexical_kind,
    semantic_window,
    semantic_kind,
    no_semantic,
    no_bm25,
    overwrite,
    jobs,
) -> None:
    """Index a corpus into a new, versioned index directory (meta.json records parameters and versions)."""
    from attribution.analysis.bm25 import BM25Params
    from attribution.analysis.index import build_index
    from attribution.analysis.lexical import LexicalParams
    from attribution.analysis.semantic import SemanticParams

    lexical = LexicalParams(
        ngram=ngram,
        num_perm=num_perm,
        window=lexical_window,
        stride=max(1, min(lexical_window // 2, lexical_window - ngram + 1)),
        kind=lexical_kind,
    )
    semantic = (
        None
        if no_semantic
        else SemanticParams(
            window=semantic_window, stride=max(1, semantic_window * 3 // 4), kind=semantic_kind
        )
    )
    meta = build_index(
        _docs(corpus),
        out,
        lexical=lexical,
        semantic=semantic,
        bm25=None if no_bm25 else BM25Params(),
        jobs=jobs,
        overwrite=overwrite,
        sources=list(corpus),
    )
    click.echo(
        f"indexed {meta['n_docs']} documents into {out} (fingerprint {meta['corpus_fingerprint'][:12]})"
    )


@index.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@_CORPUS
@_JOBS
def add_cmd(index_dir, corpus, jobs) -> None:
    """Add documents to an existing index (same parameters); BM25 is rebuilt since IDF changes."""
    from attribution.analysis.index import add_documents

    meta = add_documents(index_dir, _docs(corpus), jobs=jobs, sources=list(corpus))
    click.echo(f"{index_dir}: now {meta['n_docs']} documents, generation {meta['generation']}")


@index.command("info")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
def info_cmd(index_dir) -> None:
    """Print an index's meta.json (parameters, sizes, fingerprint, library versions)."""
    from attribution.analysis.index import read_meta

    click.echo(json.dumps(read_meta(index_dir), indent=2))


@click.command("compare")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Index directory built with `attribution index build` over the run's corpus.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the outputs.")
@click.option(
    "-k", "--top-k", "k", default=10, show_default=True, help="Documents per method and validation example."
)
@click.option(
    "--depth",
    default=100,
    show_default=True,
    help="How deep lexical/semantic rankings are retrieved (ranks beyond are empty).",
)
@click.option(
    "--view",
    default=None,
    help="Attribution view to rank by (`attribution.values.views`, e.g. value, contrast_per_token; "
    "default: the run's default view, computed when the run is read).",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a label threshold, e.g. --threshold paraphrase_semantic=0.8. Names: verbatim_containment, "
    "verbatim_span, paraphrase_semantic, low_containment, low_semantic, influence_z.",
)
def compare_cmd(run, index_dir, out, k, depth, view, thresholds) -> None:
    """Compare a run's Shapley rankings with lexical, semantic and BM25 rankings.

    \b
    For every validation example: each method's top-k documents, exact overlap measures for each
    pair (longest common span, n-gram containment both ways, semantic similarity), rank correlations
    with Shapley, target retrieval, and a label (verbatim / paraphrastic / non-obvious influence, the
    last only for a document that stands out from the run's reference set).
    Writes OUT/comparison.parquet, OUT/summary.csv, OUT/summary.md and OUT/compare.json.
    """
    from attribution.analysis.compare import Thresholds, compare_run
    from attribution.errors import UserError

    pairs = {}
    for item in thresholds:
        if "=" not in item:
            raise UserError(f"--threshold {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    table = compare_run(run, index_dir, out, k=k, depth=depth, view=view, thresholds=Thresholds.parse(pairs))
    click.echo(
        f"compared {table[['val_set', 'val_id']].drop_duplicates().shape[0]} validation examples; see {out}/summary.md"
    )


commands = [index, compare_cmd]
