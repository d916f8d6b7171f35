"""Small real-text corpora and validation sets for the training tests (written into tmp dirs)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path

_WORDS = (
    "the court held that copyright protects original expression but not ideas facts or methods and a "
    "model trained on licensed text must still credit every owner whose work lowered its loss while "
    "reviewers read the evidence before any payment is made to the authors of the books and news"
).split()


def write_corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """A JSONL corpus of three sources; document lengths vary so some span several sequences."""
    rng = random.Random(seed)
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 80)))
            fh.write(
                json.dumps(
                    {
                        "id": f"doc{i}",
                        "text": text,
                        "meta": {"pile_set_name": ["law", "news", "books"][i % 3], "owner": f"o{i % 4}"},
                    }
                )
                + "\n"
            )
    return path


def write_val(folder: Path, name: str = "val", n: int = 3, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path = folder / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(rng.choice(_WORDS) for _ in range(25))
            fh.write(
                json.dumps(
                    {
                        "id": f"{name}{i}",
                        "text": text,
                        "meta": {"variant": "paraphrase", "target_id": f"doc{i}"},
                    }
                )
                + "\n"
            )
    return path


VALUE_FILES = ("doc_values", "example_values", "step_values", "stage_values", "docs")


def lee_articles() -> list[str]:
    """Real news articles (gensim's Lee background corpus, shipped in the gensim wheel)."""
    import os

    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


def train_micro(root: Path, val: list[dict], steps: int) -> Path:
    """Write `val` as the `news` validation set and run `train_and_value` on `root/corpus.jsonl`
    with the `test-micro` model; returns the run directory."""
    from attribution.train import RunConfig, train_and_value

    with open(root / "val.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(v) + "\n" for v in val)
    cfg = RunConfig(
        corpus=[str(root / "corpus.jsonl")],
        val={"news": str(root / "val.jsonl")},
        out=str(root / "run"),
        preset="test-micro",
        steps=steps,
        lr=1e-2,
        eval_every=2,
        cache_dir=str(root / "cache"),
        progress=False,
    )
    return Path(train_and_value(cfg))


def torchrun(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local processes, on a free port of 127.0.0.1 (the
    multi-process tests run gloo on the CPU); the module or script to run goes after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]


def subprocess_env() -> dict[str, str]:
    """The environment of a test's child processes: offline, and one thread each (two share 2 cores)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
