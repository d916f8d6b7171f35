"""Corpus layer: read documents from any supported format, with source, rights holder and license."""

from attribution.corpus.document import Document

__all__ = ["Document"]
