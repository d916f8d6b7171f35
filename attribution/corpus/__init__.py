"""Corpus layer: read documents from any supported format, with source, rights holder and license."""

from attribution.corpus.builtin import resolve_corpus
from attribution.corpus.document import Document
from attribution.corpus.owners import OwnerMap, OwnerRule, load_owner_map
from attribution.corpus.readers import (
    ReadStats,
    corpus_fingerprint,
    read_corpus,
    read_corpus_located,
    read_validation,
)

__all__ = [
    "Document",
    "OwnerMap",
    "OwnerRule",
    "ReadStats",
    "corpus_fingerprint",
    "load_owner_map",
    "read_corpus",
    "read_corpus_located",
    "read_validation",
    "resolve_corpus",
]
