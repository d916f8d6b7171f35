"""GPT-2 tokens and fixed-length sequences: the real tokenizer, splitting rules, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from attribution import tokens
from attribution.corpus import Document
from attribution.errors import UserError
from attribution.tokens import (
    EOS_ID,
    SequenceSet,
    build_sequences,
    chunk_document,
    encode_texts,
    load_tokenizer,
    text_pieces,
)

HAMLET = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def test_real_gpt2_tokenizer():
    tok = load_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.get_vocab_size() == 50257 and tok.token_to_id("<|endoftext|>") == EOS_ID
    # GPT-2's handling of spaces, newlines and unicode bytes
    assert tok.encode(" Hello  world\n\n x").ids == [18435, 220, 995, 628, 2124]
    assert tok.decode(tok.encode("naïve café ☃").ids) == "naïve café ☃"


def test_long_text_pieces_tokenize_exactly(monkeypatch):
    words = (HAMLET * 4000).split(" ")
    text = " ".join(words)  # ~330k characters
    pieces = text_pieces(text, max_chars=7000)
    assert len(pieces) > 40 and "".join(pieces) == text
    monkeypatch.setattr(tokens, "_PIECE_CHARS", 7000)
    monkeypatch.setattr(tokens, "_BATCH_CHARS", 50_000)  # several encode groups per document
    ids = encode_texts([text, "short one"])
    assert ids[0].tolist() == load_tokenizer().encode(text).ids
    assert ids[1].tolist() == load_tokenizer().encode("short one").ids


def test_chunking_rules():
    ids, mask = chunk_document(np.arange(10, dtype=np.int32), 4)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, EOS_ID, EOS_ID]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    # a lone trailing token would have no label: it is dropped, not given its own sequence
    ids, mask = chunk_document(np.arange(9, dtype=np.int32), 4)
    assert ids.shape == (2, 4) and mask.sum() == 8
    ids, mask = chunk_document(np.array([5, EOS_ID], dtype=np.int32), 4)
    assert ids.tolist() == [[5, EOS_ID, EOS_ID, EOS_ID]] and mask.tolist() == [[1, 1, 0, 0]]


def _docs(n: int) -> list[Document]:
    return [
        Document(f"d{i}", (HAMLET * (1 + i % 5))[: 20 + 37 * i], f"src{i % 3}", f"owner{i % 2}", "MIT")
        for i in range(n)
    ]


def test_build_sequences_maps_every_sequence_to_its_document(tmp_path):
    docs = _docs(30)
    seqs = build_sequences(iter(docs), 32, tmp_path, "fp-test")
    assert seqs.ids.dtype == np.int32 and seqs.mask.dtype == np.uint8 and seqs.ids.shape == (len(seqs), 32)
    assert list(seqs.docs.columns) == ["doc_id", "source", "owner", "license", "n_tokens", "n_seqs"]
    assert seqs.docs["doc_id"].tolist() == [d.doc_id for d in docs]
    tok = load_tokenizer()
    for row, doc in enumerate(docs):
        expected = tok.encode(doc.text).ids + [EOS_ID]
        (where,) = np.nonzero(seqs.seq_doc == row)
        assert seqs.seq_part[where].tolist() == list(range(len(where)))
        real = np.concatenate([seqs.ids[i][seqs.mask[i] == 1] for i in where]).tolist()
        if len(expected) > 32 and len(expected) % 32 == 1:
            expected = expected[:-1]
        assert real == expected, doc.doc_id
        assert seqs.docs.loc[row, "n_tokens"] == len(real) and seqs.docs.loc[row, "n_seqs"] == len(where)
        # padding is EOS and only ever at the end of a document's last sequence
        last = seqs.mask[where[-1]]
        assert (seqs.ids[where[-1]][last == 0] == EOS_ID).all() and (np.diff(last.astype(int)) <= 0).all()
    assert (seqs.mask.sum(axis=1) >= 2).all()  # every sequence has a label to predict
    assert seqs.docs["n_seqs"].sum() == len(seqs)
    assert seqs.text(3) == docs[3].text and seqs.text("d7") == docs[7].text
    assert seqs.texts()["text"].tolist() == [d.text for d in docs]


def test_second_call_loads_the_cache_without_reading(tmp_path):
    first = build_sequences(iter(_docs(12)), 16, tmp_path, "fp-cache")

    def must_not_be_read():
        raise AssertionError("the corpus was read again")
        yield

    again = build_sequences(must_not_be_read(), 16, tmp_path, "fp-cache")
    assert again.path == first.path and isinstance(again.ids, np.memmap)
    assert np.array_equal(again.ids, first.ids) and again.docs.equals(first.docs)
    # another sequence length or fingerprint is another cache entry
    other = build_sequences(iter(_docs(12)), 24, tmp_path, "fp-cache")
    assert other.path != first.path and other.seq_len == 24
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("seq-")]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert SequenceSet.load(first.path).fingerprint == "fp-cache"


def test_failure_mid_stream_leaves_no_cache(tmp_path):
    def broken():
        yield from _docs(3)
        raise UserError("corpus.jsonl:4: invalid JSON")

    with pytest.raises(UserError):
        build_sequences(broken(), 16, tmp_path, "fp-broken")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="no documents"):
        build_sequences(iter([]), 16, tmp_path, "fp-empty")
    assert list(tmp_path.iterdir()) == []


def test_max_docs_limits_and_keys_the_cache(tmp_path):
    seqs = build_sequences(iter(_docs(20)), 16, tmp_path, "fp-max", max_docs=5)
    assert len(seqs.docs) == 5 and seqs.path.name.endswith("-m5")
