"""Analysis layer: lexical overlap and semantic similarity beside In-Run Shapley rankings.

Python API (what the report and the notebook use):

    Indexes.load(dir).lexical_search(text, k) / .semantic_search(text, k) / .bm25_search(text, k)
    build_index(docs, out) / add_documents(index_dir, docs)
    compare_run(run_dir, index_dir, out, k=10, thresholds=Thresholds()) -> DataFrame
    evidence(val_text, doc_text) -> dict with shared character spans for highlighting
"""

from attribution.analysis.compare import Thresholds, compare_run
from attribution.analysis.index import Indexes, add_documents, build_index, iter_corpus
from attribution.analysis.overlap import evidence

__all__ = ["Indexes", "Thresholds", "add_documents", "build_index", "compare_run", "evidence", "iter_corpus"]
