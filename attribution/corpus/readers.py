"""Streaming corpus readers: every supported format becomes the same stream of `Document`s.

Why one reader for everything: values are credited per document, so every document must get the
same treatment (a stable id, a source, a rights holder) whichever format it came in, and every
format must fail the same way on bad input. Nothing here holds more than one chunk of a file in
memory, so a 1 GB shard streams in bounded memory.

Formats (chosen by path):

- Pile shards: `.jsonl` or `.jsonl.zst`, one `{"text": ..., "meta": {"pile_set_name": ...}}` a line;
- a folder of shards (any `.jsonl`, `.jsonl.zst`, `.csv`, `.parquet` directly inside it);
- a folder of text files, recursively; the source is the first sub-folder's name;
- `.csv` / `.parquet` with a text column and a source column (optional `id`, `owner`, `license`);
- `hf:NAME[:split]`, a `datasets` dataset in streaming mode (needs the `hub` extra).

Bad input: with ``on_bad_line="error"`` the first bad record raises `BadInputError` (FILE:LINE: reason);
with ``"skip"`` it is counted in `ReadStats` and reading goes on. A duplicate id is always a bad record,
never an overwrite. A missing path is always an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attribution.corpus.document import Document
from attribution.corpus.owners import OwnerMap
from attribution.errors import BadInputError, UserError

OnBadLine = Literal["error", "skip"]
SHARD_SUFFIXES = (".jsonl", ".jsonl.zst", ".csv", ".parquet")
_CHUNK = 1 << 20  # bytes read at a time from a compressed shard
_FORMAT_VERSION = "corpus-v1"  # part of the fingerprint: bump when reading rules change ids or texts


def _reason_kind(reason: str) -> str:
    """The kind of a bad record, for counting: the reason without its position or details."""
    if reason.startswith("duplicate id"):
        return "duplicate id"
    return re.split(r" at | \(|:", reason, maxsplit=1)[0]


@dataclass
class ReadStats:
    """What a read produced and what it skipped, and why (filled in as the stream is consumed)."""

    read: int = 0
    files: int = 0
    by_source: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason kind -> count
    examples: list[str] = field(default_factory=list)  # the first few "FILE:LINE: reason"

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, err: BadInputError) -> None:
        self.skipped[_reason_kind(err.reason)] += 1
        if len(self.examples) < 10:
            self.examples.append(str(err))

    def summary(self) -> str:
        """One line for the user: how many documents were read and what was skipped."""
        line = f"read {self.read} documents from {self.files} file(s)"
        if self.skipped:
            kinds = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            line += f"; skipped {self.n_skipped} bad record(s) ({kinds})"
        return line


@dataclass(frozen=True)
class _Bad:
    """A record that could not be read; the reader decides whether to stop or skip."""

    line: int | None
    reason: str


@dataclass(frozen=True)
class _Input:
    kind: str  # jsonl | jsonl.zst | csv | parquet | textdir | hf
    path: Path | str  # a Path, or the `hf:` spec

    @property
    def stem(self) -> str:
        if self.kind == "hf":
            return str(self.path)[3:].split(":")[0].rstrip("/").split("/")[-1]
        name = Path(self.path).name
        for suffix in SHARD_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return Path(self.path).stem


def _kind_of_file(path: Path) -> str | None:
    name = path.name
    for suffix in (".jsonl.zst", ".jsonl", ".csv", ".parquet"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def expand_inputs(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[_Input]:
    """Turn user paths into readable inputs; a missing path or unknown format is a user error."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    inputs: list[_Input] = []
    for raw in paths:
        text = str(raw)
        if text.startswith("hf:"):
            inputs.append(_Input("hf", text))
            continue
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.is_dir():
            shards = sorted(p for p in path.iterdir() if p.is_file() and _kind_of_file(p))
            if shards:
                inputs.extend(_Input(_kind_of_file(p), p) for p in shards)  # type: ignore[arg-type]
            else:
                inputs.append(_Input("textdir", path))
            continue
        kind = _kind_of_file(path)
        if kind is None:
            raise UserError(
                f"{path}: unsupported corpus format (expected .jsonl, .jsonl.zst, .csv, .parquet, a folder or hf:NAME)"
            )
        inputs.append(_Input(kind, path))
    if not inputs:
        raise UserError("no corpus paths given")
    return inputs


# ---------------------------------------------------------------------------------------------- bytes


def _lines_from_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a stream of byte chunks into lines without rescanning (a 50 MB line stays linear)."""
    pending: list[bytes] = []
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if start < len(chunk):
                    pending.append(chunk[start:])
                break
            piece = chunk[start:end]
            if pending:
                pending.append(piece)
                piece = b"".join(pending)
                pending = []
            yield piece
            start = end + 1
    if pending:
        yield b"".join(pending)


class _Truncated(Exception):
    """The compressed stream ended inside a frame, or is corrupt."""


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompress a (possibly multi-frame) zstd file chunk by chunk; raise _Truncated if it is cut short."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    fed = False
    with open(path, "rb") as fh:
        while raw := fh.read(_CHUNK):
            while raw:
                fed = True
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as exc:
                    raise _Truncated(f"corrupt zstd data ({exc})") from None
                if out:
                    yield out
                if dobj.eof:
                    raw = dobj.unused_data
                    dobj = dctx.decompressobj()
                    fed = False
                else:
                    raw = b""
    if fed and not dobj.eof:
        raise _Truncated("truncated zstd stream (the file ends inside a frame)")


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while raw := fh.read(_CHUNK):
            yield raw


# -------------------------------------------------------------------------------------------- records


def _parse_json_line(raw: bytes, line: int) -> dict | _Bad:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Bad(line, f"invalid UTF-8 at column {exc.start + 1}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return _Bad(line, f"invalid JSON at column {exc.colno}: {exc.msg}")
    if not isinstance(obj, dict):
        return _Bad(line, f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(obj), "null"
    )


def _jsonl_records(inp: _Input) -> Iterator[tuple[int, dict | _Bad]]:
    path = Path(inp.path)
    chunks = _zstd_chunks(path) if inp.kind == "jsonl.zst" else _file_chunks(path)
    line = 0
    try:
        for raw in _lines_from_chunks(chunks):
            line += 1
            if not raw.strip():
                continue  # blank lines (a trailing newline, a separator) carry no document
            yield line, _parse_json_line(raw.rstrip(b"\r"), line)
    except _Truncated as exc:
        raise BadInputError(path, line + 1, str(exc)) from None


def _row_record(row: Mapping[str, Any], text_column: str, source_column: str) -> dict:
    """A table row in the Pile's shape, so one function builds documents for every format."""
    meta = dict(row["meta"]) if isinstance(row.get("meta"), Mapping) else {}
    for key in ("owner", "license"):
        if row.get(key) not in (None, ""):
            meta.setdefault(key, row[key])
    if row.get(source_column) not in (None, ""):
        meta.setdefault("pile_set_name", row[source_column])
    record = {"text": row.get(text_column), "meta": meta}
    if row.get("id") not in (None, ""):
        record["id"] = row["id"]
    return record


def _csv_records(inp: _Input, text_column: str, source_column: str) -> Iterator[tuple[int, dict | _Bad]]:
    """Rows with the *physical* line each starts on (a quoted cell may span lines)."""
    import csv
    import sys

    path = Path(inp.path)
    csv.field_size_limit(sys.maxsize)  # scraped texts are far longer than csv's 128 kB default
    line = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if text_column not in header:
                raise BadInputError(path, 1, f"no {text_column!r} column (columns: {', '.join(header)})")
            line = reader.line_num + 1
            for row in reader:
                if None in row:  # more cells than header columns
                    raise BadInputError(
                        path, line, f"{len(header) + len(row[None])} cells, the header has {len(header)}"
                    )
                yield (
                    line,
                    _row_record(
                        {k: ("" if v is None else v) for k, v in row.items()}, text_column, source_column
                    ),
                )
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise BadInputError(path, line, "invalid UTF-8 in this row or the next ones") from None
    except csv.Error as exc:
        raise BadInputError(path, line, f"invalid CSV ({exc})") from None


def _parquet_records(inp: _Input, text_column: str, source_column: str) -> Iterator[tuple[int, dict | _Bad]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(inp.path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(path, None, f"invalid Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise BadInputError(path, None, f"no {text_column!r} column (columns: {', '.join(names)})")
    wanted = [c for c in (text_column, source_column, "id", "owner", "license", "meta") if c in names]
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024, columns=wanted):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, _row_record(row, text_column, source_column)


def _textdir_records(inp: _Input) -> Iterator[tuple[int | None, dict | _Bad, Path]]:
    root = Path(inp.path)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            rel = file.relative_to(root)
            source = rel.parts[0] if len(rel.parts) > 1 else root.name
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                yield None, _Bad(None, f"invalid UTF-8 at byte offset {exc.start}"), file
                continue
            yield None, {"id": rel.as_posix(), "text": text, "meta": {"pile_set_name": source}}, file


def _hf_records(inp: _Input, text_column: str, source_column: str) -> Iterator[tuple[int, dict | _Bad]]:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: corpora need the `datasets` library: pip install 'attribution[hub]'") from None
    spec = str(inp.path)[3:]
    name, split = spec, "train"
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail and tail:
        name, split = head, tail
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise UserError(f"{inp.path}: cannot open dataset ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(ds, 1):
        yield i, _row_record(row, text_column, source_column)


# ----------------------------------------------------------------------------------------- documents


def derived_id(stem: str, line: int | None, text: str) -> str:
    """An id for a document that has none: its position and a hash of its text, stable across runs."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()
    return f"{stem}:{line}:{digest}" if line is not None else f"{stem}:{digest}"


def _document(
    record: dict, *, stem: str, line: int | None, owner_map: OwnerMap | None, default_source: str
) -> Document | _Bad:
    if "text" not in record or record["text"] is None:
        return _Bad(line, "missing 'text' field")
    text = record["text"]
    if not isinstance(text, str):
        return _Bad(line, f"'text' must be a string, got {_json_type(text)}")
    if not text.strip():
        return _Bad(line, "empty text")
    meta = record.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return _Bad(line, f"'meta' must be an object, got {_json_type(meta)}")
    raw_id = record.get("id", meta.get("id"))
    if raw_id is not None and not isinstance(raw_id, str | int):
        return _Bad(line, f"'id' must be a string or integer, got {_json_type(raw_id)}")
    doc_id = str(raw_id) if raw_id not in (None, "") else derived_id(stem, line, text)
    source = str(meta.get("pile_set_name") or meta.get("source") or default_source)
    owner = str(meta.get("owner") or "unknown")
    license_ = meta.get("license")
    rule = owner_map.lookup(doc_id, source) if owner_map is not None else None
    if rule is not None:
        owner = rule.owner
        license_ = rule.license or license_
    return Document(doc_id, text, source, owner, None if license_ is None else str(license_), meta)


def _raw_records(
    inp: _Input, text_column: str, source_column: str
) -> Iterator[tuple[int | None, dict | _Bad, Path | str]]:
    if inp.kind in ("jsonl", "jsonl.zst", "csv", "parquet") and Path(inp.path).stat().st_size == 0:
        raise BadInputError(inp.path, None, "empty file (0 bytes)")
    if inp.kind == "textdir":
        yield from _textdir_records(inp)
        return
    if inp.kind in ("jsonl", "jsonl.zst"):
        records: Iterator[tuple[int, dict | _Bad]] = _jsonl_records(inp)
    elif inp.kind == "csv":
        records = _csv_records(inp, text_column, source_column)
    elif inp.kind == "parquet":
        records = _parquet_records(inp, text_column, source_column)
    else:
        records = _hf_records(inp, text_column, source_column)
    for line, rec in records:
        yield line, rec, inp.path


def _id_key(doc_id: str) -> bytes:
    # 8-byte digests instead of the ids themselves keep the duplicate check small for huge corpora.
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()


def read_corpus(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    on_bad_line: OnBadLine = "error",
    owner_map: OwnerMap | None = None,
    stats: ReadStats | None = None,
    text_column: str = "text",
    source_column: str = "source",
) -> Iterator[Document]:
    """Stream the documents of one or more corpus paths, in order, with ids, sources and owners.

    Raises `UserError` at once for a missing path; `BadInputError` for the first bad record unless
    ``on_bad_line="skip"``, which counts it in `stats` and goes on (a broken file is skipped whole).
    """
    for _, _, doc in read_corpus_located(
        paths,
        on_bad_line=on_bad_line,
        owner_map=owner_map,
        stats=stats,
        text_column=text_column,
        source_column=source_column,
    ):
        yield doc


def read_corpus_located(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    on_bad_line: OnBadLine = "error",
    owner_map: OwnerMap | None = None,
    stats: ReadStats | None = None,
    text_column: str = "text",
    source_column: str = "source",
) -> Iterator[tuple[str, int | None, Document]]:
    """`read_corpus` with each document's file and line (None where a format has no lines), so that
    a check made after reading can still name `FILE:LINE` as the reader's own errors do."""
    if on_bad_line not in ("error", "skip"):
        raise UserError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    stats = stats if stats is not None else ReadStats()
    inputs = expand_inputs(paths)
    seen: set[bytes] = set()

    def bad(path: Path | str, line: int | None, reason: str) -> None:
        err = BadInputError(path, line, reason)
        if on_bad_line == "error":
            raise err
        stats.skip(err)

    for inp in inputs:
        stats.files += 1
        try:
            for line, rec, path in _raw_records(inp, text_column, source_column):
                if isinstance(rec, _Bad):
                    bad(path, rec.line, rec.reason)
                    continue
                doc = _document(rec, stem=inp.stem, line=line, owner_map=owner_map, default_source=inp.stem)
                if isinstance(doc, _Bad):
                    bad(path, doc.line, doc.reason)
                    continue
                key = _id_key(doc.doc_id)
                if key in seen:
                    bad(path, line, f"duplicate id {doc.doc_id!r}")
                    continue
                seen.add(key)
                stats.read += 1
                stats.by_source[doc.source] += 1
                yield str(path), line, doc
        except BadInputError as err:
            if on_bad_line == "error":
                raise
            stats.skip(err)  # a file-level problem: skip the rest of this file


def read_validation(path: str | os.PathLike, *, on_bad_line: OnBadLine = "error") -> list[Document]:
    """Read a validation set: JSONL `{"id", "text", "meta": {"variant", "target_id", ...}}`.

    The source is `meta.source` (or `meta.pile_set_name`), else the file's stem. Same bad-input rules
    as `read_corpus`; a validation set is small, so it is returned as a list.
    """
    inp = expand_inputs([path])
    if len(inp) != 1 or inp[0].kind not in ("jsonl", "jsonl.zst") or Path(path).is_dir():
        raise UserError(f"{path}: a validation set must be one .jsonl or .jsonl.zst file")
    return list(read_corpus([path], on_bad_line=on_bad_line))


def corpus_fingerprint(
    paths: Sequence[str | os.PathLike] | str | os.PathLike, *, owner_map: OwnerMap | None = None
) -> str:
    """A content hash of the corpus files (names relative to what was given, sizes, bytes).

    It keys the token cache: the same bytes give the same fingerprint wherever the corpus lives, and
    any change to any file gives a new one. Pass the owner map used for reading, since owners are
    stored in the cache too. (`hf:` datasets are keyed by name only.)
    """
    h = hashlib.blake2b(_FORMAT_VERSION.encode(), digest_size=16)
    if owner_map is not None:
        h.update(repr(owner_map.rules).encode())
    for inp in expand_inputs(paths):
        if inp.kind == "hf":
            h.update(f"hf\0{inp.path}\0".encode())
            continue
        root = Path(inp.path)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            rel = file.name if file == root else f"{root.name}/{file.relative_to(root).as_posix()}"
            h.update(f"{inp.kind}\0{rel}\0{file.stat().st_size}\0".encode())
            with open(file, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
    return h.hexdigest()
