"""Build, extend and load the analysis indexes: lexical (MinHash + FAISS binary), semantic (MiniLM +
FAISS) and BM25, side by side in one versioned directory.

Layout of an index directory:

    meta.json                 format version, generation, corpus fingerprint, parameters, library versions
    docs.parquet              doc_id, source, owner, license, n_words (row order = index row order)
    texts.bin, text_offsets.npy   the texts, for exact re-ranking and evidence
    lexical/                  signatures.npy, window_doc.npy, set_size.npy, codes.faiss
    semantic/                 embeddings.npy, window_doc.npy, vectors.faiss
    bm25/                     bm25s's own files

Every build or addition is staged in a sibling directory and swapped in at the end, so readers see
either the old index or the new one. Files are replaced, never modified in place, which lets the
stage start as hard links of the current files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from attribution import __version__
from attribution.analysis.bm25 import BM25Index, BM25Params
from attribution.analysis.bm25 import build as build_bm25
from attribution.analysis.lexical import LexicalIndex, LexicalParams, Signer
from attribution.analysis.semantic import MODEL, SemanticIndex, SemanticParams, embed_windows
from attribution.analysis.store import TextStore, TextWriter, fingerprint
from attribution.corpus.document import Document
from attribution.errors import UserError
from attribution.io import atomic_write
from attribution.text import words
from attribution.values import RunDir

FORMAT = "attribution-index"
FORMAT_VERSION = 1
DEFAULT_SEMANTIC = SemanticParams()
DEFAULT_BM25 = BM25Params()


# ---------------------------------------------------------------- reading a corpus


def _run_docs(path: Path) -> Path | None:
    """The docs.parquet of a run directory (or the file itself), else None."""
    run = RunDir(path)
    if path.is_dir() and run.docs_path.is_file() and run.manifest_path.is_file():
        return run.docs_path
    if path.is_file() and path.name == "docs.parquet":
        return path
    return None


def iter_corpus(paths: Sequence[str | os.PathLike]) -> Iterator[Document]:
    """Documents from corpus paths (any format `attribution.corpus.read_corpus` reads) or from a run.

    A run directory (or its `docs.parquet`) is read directly, keeping the run's doc_ids, so that the
    index and the run's values join on doc_id.
    """
    from attribution.corpus import read_corpus

    for spec in paths:
        path = Path(spec)
        run_docs = _run_docs(path)
        if run_docs is None:
            yield from read_corpus([spec])
            continue
        table = pd.read_parquet(run_docs)
        if "text" not in table.columns:
            raise UserError(f"{run_docs}: no text column; the run was written without document texts")
        for row in table.to_dict("records"):
            lic = row.get("license")
            yield Document(
                doc_id=str(row["doc_id"]),
                text=str(row["text"]),
                source=str(row.get("source") or "unknown"),
                owner=str(row.get("owner") or "unknown"),
                license=None if lic is None or pd.isna(lic) else str(lic),
            )


# ---------------------------------------------------------------- meta


def library_versions() -> dict[str, str]:
    import bm25s
    import faiss
    import sentence_transformers

    return {
        "attribution": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "bm25s": bm25s.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{directory}: not an index directory (no meta.json); build one with `attribution index build`"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: index format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}; rebuild it with this version"
        )
    return meta


# ---------------------------------------------------------------- staging


def _stage(target: Path, copy_from: Path | None) -> Path:
    """A private sibling directory to build in; with `copy_from`, hard links of its files (copies if links fail)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging.", dir=target.parent))
    if copy_from is not None:
        for src in copy_from.rglob("*"):
            dst = stage / src.relative_to(copy_from)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    return stage


def _swap_in(stage: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "index")
    os.replace(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- build / add


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ingest(
    stage: Path,
    docs: Iterable[Document],
    first_row: int,
    known: set[str],
    lexical: LexicalParams,
    semantic: SemanticParams | None,
    jobs: int | None,
    batch: int,
) -> dict[str, Any]:
    """Append documents to the staged store; return their lexical/semantic arrays and counts."""
    writer = TextWriter(stage)
    sigs, lwd, sizes, vecs, swd = [], [], [], [], []
    row = first_row
    try:
        with Signer(lexical, jobs) as signer, tqdm(desc="indexing", unit="doc") as bar:
            for chunk in _batches(docs, batch):
                for d in chunk:
                    if d.doc_id in known:
                        raise UserError(
                            f"duplicate doc_id {d.doc_id!r}: already in the index or earlier in the corpus"
                        )
                    known.add(d.doc_id)
                texts = [d.text for d in chunk]
                rows = pd.DataFrame(
                    {
                        "doc_id": [d.doc_id for d in chunk],
                        "source": [d.source for d in chunk],
                        "owner": [d.owner for d in chunk],
                        "license": [d.license for d in chunk],
                        "n_words": [len(words(t)) for t in texts],
                    }
                )
                writer.add(rows, texts)
                s, w, z = signer.sign(texts)
                sigs.append(s)
                lwd.append(w + row)
                sizes.append(z)
                if semantic is not None:
                    v, sw = embed_windows(texts, semantic)
                    vecs.append(v)
                    swd.append(sw + row)
                row += len(chunk)
                bar.update(len(chunk))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    k = lexical.num_perm
    return {
        "n_new": row - first_row,
        "sigs": np.concatenate(sigs) if sigs else np.zeros((0, k), np.uint32),
        "lex_window_doc": np.concatenate(lwd) if lwd else np.zeros(0, np.int64),
        "set_size": np.concatenate(sizes) if sizes else np.zeros(0, np.int32),
        "vecs": np.concatenate(vecs) if vecs else np.zeros((0, 384), np.float32),
        "sem_window_doc": np.concatenate(swd) if swd else np.zeros(0, np.int64),
    }


def _write_components(stage: Path, got: dict[str, Any], meta: dict[str, Any], append: bool) -> None:
    lexical = LexicalParams(**meta["lexical"]["params"])
    meta["lexical"]["kind"] = LexicalIndex.write(
        stage / "lexical", lexical, got["sigs"], got["lex_window_doc"], got["set_size"], append=append
    )
    meta["lexical"]["n_windows"] = int(np.load(stage / "lexical" / "window_doc.npy", mmap_mode="r").shape[0])
    if "semantic" in meta:
        semantic = SemanticParams(**meta["semantic"]["params"])
        meta["semantic"]["kind"] = SemanticIndex.write(
            stage / "semantic", semantic, got["vecs"], got["sem_window_doc"], append=append
        )
        meta["semantic"]["n_windows"] = int(
            np.load(stage / "semantic" / "window_doc.npy", mmap_mode="r").shape[0]
        )
    if "bm25" in meta:  # IDF depends on every document: rebuilt from the stored texts
        store = TextStore(stage)
        build_bm25(
            stage / "bm25", [store[i] for i in range(len(store))], BM25Params(**meta["bm25"]["params"])
        )


def _finish_meta(stage: Path, meta: dict[str, Any], sources: Sequence[str], n_new: int) -> None:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    meta["n_docs"] = int(len(pd.read_parquet(stage / "docs.parquet", columns=["doc_id"])))
    meta["corpus_fingerprint"] = fingerprint(stage)
    meta["updated"] = now
    meta["versions"] = library_versions()
    meta.setdefault("history", []).append(
        {"generation": meta["generation"], "at": now, "added": n_new, "sources": list(sources)}
    )
    with atomic_write(stage / "meta.json") as fh:
        json.dump(meta, fh, indent=2)


def build_index(
    docs: Iterable[Document],
    out: str | os.PathLike,
    *,
    lexical: LexicalParams | None = None,
    semantic: SemanticParams | None = DEFAULT_SEMANTIC,
    bm25: BM25Params | None = DEFAULT_BM25,
    jobs: int | None = None,
    batch: int = 5000,
    overwrite: bool = False,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """Index `docs` into a new directory `out`; returns its meta. `semantic=None` / `bm25=None` skip those parts.

    `jobs` worker processes compute MinHash signatures (default: all cores).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out} exists and is not empty; use --overwrite to replace it, or `index add` to extend it"
        )
    lexical = lexical or LexicalParams()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": 1,
        "created": now,
        "lexical": {"params": asdict(lexical)},
    }
    if semantic is not None:
        meta["semantic"] = {"params": asdict(semantic), "model": MODEL}
    if bm25 is not None:
        meta["bm25"] = {"params": asdict(bm25)}
    stage = _stage(out, None)
    try:
        got = _ingest(stage, docs, 0, set(), lexical, semantic, jobs, batch)
        if got["n_new"] == 0:
            raise UserError("the corpus has no documents")
        _write_components(stage, got, meta, append=False)
        _finish_meta(stage, meta, sources, got["n_new"])
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta


def add_documents(
    index_dir: str | os.PathLike,
    docs: Iterable[Document],
    *,
    jobs: int | None = None,
    batch: int = 5000,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """Add documents to an existing index with its own parameters; the generation number goes up by one.

    A doc_id already in the index is an error (ids are what runs and reports join on).
    """
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    lexical = LexicalParams(**meta["lexical"]["params"])
    semantic = SemanticParams(**meta["semantic"]["params"]) if "semantic" in meta else None
    known = set(pd.read_parquet(index_dir / "docs.parquet", columns=["doc_id"])["doc_id"])
    stage = _stage(index_dir, index_dir)
    try:
        got = _ingest(stage, docs, len(known), known, lexical, semantic, jobs, batch)
        if got["n_new"] == 0:
            raise UserError("no documents to add")
        meta["generation"] += 1
        _write_components(stage, got, meta, append=True)
        _finish_meta(stage, meta, sources, got["n_new"])
        _swap_in(stage, index_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta


# ---------------------------------------------------------------- querying


class Indexes:
    """All indexes of one directory, for queries: `Indexes.load(dir).lexical_search(text, k)`.

    FAISS is limited to `threads` OpenMP threads: a single query is far faster on one thread than
    on several that compete for a busy machine (see docs/benchmarks.md).
    """

    def __init__(self, directory: str | os.PathLike, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.store = TextStore(self.directory)
        self.lexical = LexicalIndex(
            self.directory / "lexical",
            LexicalParams(**self.meta["lexical"]["params"]),
            self.meta["lexical"]["kind"],
            self.store,
        )
        self.semantic = (
            SemanticIndex(self.directory / "semantic", SemanticParams(**self.meta["semantic"]["params"]))
            if "semantic" in self.meta
            else None
        )
        self.bm25 = BM25Index(self.directory / "bm25") if "bm25" in self.meta else None

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int = 1) -> Indexes:
        return cls(directory, threads)

    @property
    def ngram(self) -> int:
        return self.lexical.params.ngram

    def _frame(self, hits: list[tuple], columns: list[str]) -> pd.DataFrame:
        rows = [h[0] for h in hits]
        docs = self.store.docs.iloc[rows]
        frame = pd.DataFrame({"rank": np.arange(1, len(hits) + 1), "doc_id": docs["doc_id"].to_numpy()})
        for j, name in enumerate(columns, start=1):
            frame[name] = [h[j] for h in hits]
        frame["source"] = docs["source"].to_numpy()
        frame["owner"] = docs["owner"].to_numpy()
        return frame

    def _need(self, part: str):
        got = getattr(self, part)
        if got is None:
            raise UserError(f"{self.directory} was built without the {part} index")
        return got

    def lexical_search(self, text: str, k: int = 10) -> pd.DataFrame:
        """Top-k documents by exact n-gram containment of `text` (candidates from MinHash codes)."""
        return self._frame(self.lexical.search(text, k), ["containment", "jaccard_estimate"])

    def semantic_search(self, text: str, k: int = 10) -> pd.DataFrame:
        """Top-k documents by MiniLM cosine similarity (best window pair)."""
        return self._frame(self._need("semantic").search(text, k), ["cosine"])

    def bm25_search(self, text: str, k: int = 10) -> pd.DataFrame:
        """Top-k documents by BM25 score (documents sharing no query term are left out)."""
        return self._frame(self._need("bm25").search(text, k), ["bm25"])

    def text(self, doc_id: str) -> str:
        row = self.store.row(doc_id)
        if row is None:
            raise UserError(f"doc_id {doc_id!r} is not in the index {self.directory}")
        return self.store[row]
