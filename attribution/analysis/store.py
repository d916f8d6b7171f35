"""The indexed documents' texts and metadata, kept beside the indexes.

Exact re-ranking needs any candidate's text in microseconds, so texts are one UTF-8 blob plus an
offsets array, both memory-mapped: row i is `blob[offsets[i]:offsets[i + 1]]`. Metadata (doc_id,
source, owner, license, n_words) is a small Parquet table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.io import atomic_path

DOC_COLUMNS = ["doc_id", "source", "owner", "license", "n_words"]
_READ = 1 << 22


class TextStore:
    """Read side: `store[i]` is document row i's text, `store.row(doc_id)` its row."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.docs = pd.read_parquet(self.directory / "docs.parquet")
        self.offsets = np.load(self.directory / "text_offsets.npy", mmap_mode="r")
        blob_path = self.directory / "texts.bin"
        self._blob = (
            np.memmap(blob_path, dtype=np.uint8, mode="r")
            if blob_path.stat().st_size
            else np.zeros(0, np.uint8)
        )
        self._rows = {d: i for i, d in enumerate(self.docs["doc_id"].tolist())}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        return bytes(self._blob[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")

    def row(self, doc_id: str) -> int | None:
        return self._rows.get(doc_id)

    def doc_ids(self) -> list[str]:
        return self.docs["doc_id"].tolist()


class TextWriter:
    """Write side: appends documents to a store (creating it if needed), streaming, in one pass.

    Nothing is visible until `commit()`, which replaces each file atomically; if the block that
    uses the writer fails, the old store stays as it was.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._blob_ctx = atomic_path(self.directory / "texts.bin")
        self._blob_tmp = self._blob_ctx.__enter__()
        self._out = open(self._blob_tmp, "wb")
        old_blob = self.directory / "texts.bin"
        if old_blob.exists():
            with open(old_blob, "rb") as old:
                while chunk := old.read(_READ):
                    self._out.write(chunk)
        offsets_path = self.directory / "text_offsets.npy"
        self._offsets = [np.load(offsets_path)] if offsets_path.exists() else [np.zeros(1, np.int64)]
        self._end = int(self._offsets[0][-1])
        docs_path = self.directory / "docs.parquet"
        self._frames = [pd.read_parquet(docs_path)] if docs_path.exists() else []

    def add(self, rows: pd.DataFrame, texts: list[str]) -> None:
        encoded = [t.encode("utf-8") for t in texts]
        for e in encoded:
            self._out.write(e)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        ends = self._end + np.cumsum(lengths)
        self._offsets.append(ends)
        if len(ends):
            self._end = int(ends[-1])
        self._frames.append(rows[DOC_COLUMNS].reset_index(drop=True))

    def commit(self) -> None:
        self._out.close()
        self._blob_ctx.__exit__(None, None, None)
        with atomic_path(self.directory / "text_offsets.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(self._offsets))
        docs = (
            pd.concat(self._frames, ignore_index=True) if self._frames else pd.DataFrame(columns=DOC_COLUMNS)
        )
        with atomic_path(self.directory / "docs.parquet") as tmp:
            docs.to_parquet(tmp, index=False)

    def abort(self) -> None:
        """Drop what was written; the store is left as it was."""
        self._out.close()
        self._blob_tmp.unlink(missing_ok=True)


def fingerprint(directory: Path) -> str:
    """Content hash of the stored corpus (ids, order and texts): equal fingerprints, equal corpora."""
    h = hashlib.sha256()
    directory = Path(directory)
    for doc_id in pd.read_parquet(directory / "docs.parquet", columns=["doc_id"])["doc_id"]:
        h.update(doc_id.encode("utf-8") + b"\0")
    h.update(np.load(directory / "text_offsets.npy").tobytes())
    with open(directory / "texts.bin", "rb") as fh:
        while chunk := fh.read(_READ):
            h.update(chunk)
    return h.hexdigest()
