"""Corpus readers: every format yields the same Documents, with stable ids, sources and owners."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import zstandard

from attribution.corpus import (
    ReadStats,
    corpus_fingerprint,
    load_owner_map,
    read_corpus,
    read_validation,
)
from attribution.errors import UserError

RECORDS = [
    {"text": "The first document.", "meta": {"pile_set_name": "Pile-CC", "owner": "Alice"}, "id": "d1"},
    {
        "text": "Second, with its id in meta.",
        "meta": {"pile_set_name": "Github", "id": "d2", "license": "MIT"},
    },
    {"text": "Third has no id at all.", "meta": {"pile_set_name": "Pile-CC"}},
]


def _jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_pile_jsonl_fields(tmp_path):
    docs = list(read_corpus([_write(tmp_path / "shard.jsonl", _jsonl(RECORDS))]))
    assert [d.doc_id for d in docs[:2]] == ["d1", "d2"]
    assert docs[0].source == "Pile-CC" and docs[0].owner == "Alice" and docs[0].license is None
    assert docs[1].source == "Github" and docs[1].owner == "unknown" and docs[1].license == "MIT"
    # derived id: position and content, stable across reads and independent of the folder
    assert docs[2].doc_id.startswith("shard:3:")
    other = tmp_path / "elsewhere"
    other.mkdir()
    again = list(read_corpus([_write(other / "shard.jsonl", _jsonl(RECORDS))]))
    assert [d.doc_id for d in again] == [d.doc_id for d in docs]
    changed = RECORDS[:2] + [{**RECORDS[2], "text": "Third, edited."}]
    assert list(read_corpus([_write(other / "shard.jsonl", _jsonl(changed))]))[2].doc_id != docs[2].doc_id


def test_zst_multi_frame_equals_plain(tmp_path):
    plain = _write(tmp_path / "a.jsonl", _jsonl(RECORDS))
    cctx = zstandard.ZstdCompressor()
    # two frames back to back, as concatenated shards are
    data = cctx.compress(_jsonl(RECORDS[:1])) + cctx.compress(_jsonl(RECORDS[1:]))
    zst = _write(tmp_path / "a.jsonl.zst", data)
    assert list(read_corpus([zst])) == list(read_corpus([plain]))


def test_text_folder_source_is_subfolder(tmp_path):
    root = tmp_path / "texts"
    (root / "poems").mkdir(parents=True)
    (root / "letters").mkdir()
    (root / "poems" / "a.txt").write_text("Roses are red.")
    (root / "letters" / "b.md").write_text("Dear Sir,")
    (root / "top.txt").write_text("At the top.")
    (root / ".hidden").write_text("not read")
    docs = {d.doc_id: d for d in read_corpus([root])}
    assert set(docs) == {"letters/b.md", "poems/a.txt", "top.txt"}
    assert docs["poems/a.txt"].source == "poems" and docs["top.txt"].source == "texts"


def test_csv_and_parquet_columns(tmp_path):
    frame = pd.DataFrame(
        {"body": ["alpha text", "beta text"], "site": ["s1", "s2"], "id": ["a", ""], "owner": ["O1", ""]}
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    for name in ("t.csv", "t.parquet"):
        docs = list(read_corpus([tmp_path / name], text_column="body", source_column="site"))
        assert [(d.text, d.source, d.owner) for d in docs] == [
            ("alpha text", "s1", "O1"),
            ("beta text", "s2", "unknown"),
        ]
        assert docs[0].doc_id == "a" and docs[1].doc_id.startswith("t:")
    with pytest.raises(UserError, match="no 'text' column"):
        list(read_corpus([tmp_path / "t.csv"]))


def test_csv_errors_name_the_physical_line_after_multiline_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text,source\n"first line\nsecond line\nthird",web\n"",web\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"m\.csv:5: empty text"):  # the header is line 1, the 3-line cell 2-4
        list(read_corpus([path]))
    path.write_text('text,source\n"ok",web\n"a","web","extra"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"m\.csv:3: 3 cells, the header has 2"):
        list(read_corpus([path]))


def test_folder_of_shards_and_stats(tmp_path):
    _write(tmp_path / "00.jsonl", _jsonl(RECORDS[:2]))
    _write(tmp_path / "01.jsonl", _jsonl(RECORDS[2:]))
    stats = ReadStats()
    docs = list(read_corpus([tmp_path], stats=stats))
    assert len(docs) == 3 and stats.read == 3 and stats.files == 2
    assert stats.by_source == {"Pile-CC": 2, "Github": 1}


def test_hf_local_dataset_streams(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hfset"
    folder.mkdir()
    _write(
        folder / "train.jsonl",
        b'{"text": "from the hub", "source": "web", "id": "h1"}\n{"text": "two", "source": "web"}\n',
    )
    docs = list(read_corpus([f"hf:{folder}:train"]))
    assert [(d.doc_id, d.text, d.source) for d in docs[:1]] == [("h1", "from the hub", "web")]
    assert len(docs) == 2


def test_owner_map_toml_and_csv(tmp_path):
    toml = tmp_path / "owners.toml"
    toml.write_text(
        '[sources]\nGithub = { owner = "GitHub users", license = "various" }\n"Pile-*" = "Common Crawl"\n\n'
        '[[ids]]\npattern = "d1"\nowner = "Alice Ltd"\n'
    )
    csv = tmp_path / "owners.csv"
    csv.write_text(
        "kind,pattern,owner,license\nid,d1,Alice Ltd,\nsource,Github,GitHub users,various\nsource,Pile-*,Common Crawl,\n"
    )
    shard = _write(tmp_path / "s.jsonl", _jsonl(RECORDS))
    for path in (toml, csv):
        owners = load_owner_map(path)
        docs = list(read_corpus([shard], owner_map=owners))
        # id rules beat source rules and override the owner the document carried ("Alice")
        assert [d.owner for d in docs] == ["Alice Ltd", "GitHub users", "Common Crawl"]
        assert docs[1].license == "various" and docs[0].license is None
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,pattern,owner\nfolder,x,y\n")
    with pytest.raises(UserError, match="bad.csv:2: kind must be"):
        load_owner_map(bad)


def test_repo_owner_map_loads():
    owners = load_owner_map(Path(__file__).parents[1] / "corpora" / "owners.toml")
    assert (
        owners.lookup("github/cpython/Lib/json/decoder.py#0", "github").owner == "Python Software Foundation"
    )


def test_fingerprint_tracks_content_not_location(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _write(tmp_path / "x" / "s.jsonl", _jsonl(RECORDS))
    b = _write(tmp_path / "y" / "s.jsonl", _jsonl(RECORDS))
    assert corpus_fingerprint([a]) == corpus_fingerprint([b])
    b.write_bytes(_jsonl(RECORDS[:2]))
    assert corpus_fingerprint([a]) != corpus_fingerprint([b])
    owners = load_owner_map(Path(__file__).parents[1] / "corpora" / "owners.toml")
    assert corpus_fingerprint([a], owner_map=owners) != corpus_fingerprint([a])


def test_read_validation_source_and_meta(tmp_path):
    path = _write(
        tmp_path / "heldout.jsonl",
        _jsonl(
            [
                {"id": "v1", "text": "A paraphrase.", "meta": {"variant": "paraphrase", "target_id": "d1"}},
                {"id": "v2", "text": "Plain.", "meta": {"source": "wiki"}},
            ]
        ),
    )
    docs = read_validation(path)
    assert [d.source for d in docs] == ["heldout", "wiki"]
    assert docs[0].meta["target_id"] == "d1" and docs[0].meta["variant"] == "paraphrase"
    with pytest.raises(UserError, match="validation set must be one"):
        read_validation(tmp_path)
