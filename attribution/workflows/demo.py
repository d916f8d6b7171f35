"""`attribution demo`: the built-in corpus, two validation sets, a cpu-tiny run, and the report.

The validation sets (recipe also in `corpora/val/README.md`):

- `rewrites`: for a few training documents (one per source, 400-1500 characters, so each is one or a
  few training sequences), an excerpt of the document (its first ~600 characters, cut at a sentence
  end) is turned into (a) a `paraphrase` by the offline thesaurus rewriter of `attribution.variants`
  (or, if that package is unavailable, a word-order shuffle of each sentence, recorded in `meta`),
  and (b) a `partial_copy`: the excerpt quoted as the answer to a new instruction. Every example
  records `target_id`, the training document it was made from; the originals stay in training.
- `news` (per-domain): excerpts of held-out news articles; these documents are kept out of
  training (`exclude_ids`), so this set measures what each source contributes to a domain the model
  never saw directly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from attribution.values import Manifest, RunDir, RunValues, rank_of
from attribution.variants.build import write_jsonl

DEMO_CORPUS = "builtin:400"
DOMAIN_SOURCE = "news"
N_TARGETS = 4
N_DOMAIN = 8
EXCERPT_CHARS = 240  # about 60 tokens: one validation sequence of the cpu-tiny preset


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of a text, cut after the last sentence end (or line end) before `limit`."""
    head = text[:limit]
    cut = max(head.rfind(". "), head.rfind(".\n"), head.rfind("\n\n"))
    return (head[: cut + 1] if cut > limit // 3 else head).strip()


def _paraphrase(text: str, seed: int) -> tuple[str, str]:
    try:
        from attribution.variants.rewriters import make_rewriter

        return make_rewriter("offline").rewrite(text, "paraphrase", seed).text, "offline-thesaurus"
    except ImportError:
        rng = random.Random(seed)
        out = []
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            rng.shuffle(words)
            out.append(" ".join(words))
        return " ".join(out), "fallback-word-shuffle"


def seen_documents(cfg) -> dict[str, float]:
    """For each document, the fraction of its sequences the run will train on at least once.

    A few-minute demo sees only part of the corpus; the batches are a deterministic function of the
    seed, so the rewrite targets are chosen among documents the run will actually train on."""
    import numpy as np

    from attribution.train.distributed import DistInfo
    from attribution.train.loop import Sampler, default_cache_dir, load_training

    cfg = cfg.resolved()
    data = load_training(cfg, {}, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), DistInfo())
    total = cfg.total_steps(len(data.train_seqs))
    drawn = np.unique(Sampler(data.train_seqs, cfg.seed).take(0, total * cfg.batch_size))
    seq_doc = np.asarray(data.seqset.seq_doc)
    n_seen = np.bincount(seq_doc[drawn], minlength=len(data.seqset.docs))
    frac = n_seen / np.maximum(data.seqset.docs["n_seqs"].to_numpy(), 1)
    return dict(zip(data.seqset.docs["doc_id"].astype(str), frac.tolist(), strict=True))


def build_validation_sets(
    corpus_spec: str, folder: Path, seed: int = 0, cfg=None
) -> tuple[dict[str, str], list[str]]:
    """Write `rewrites.jsonl` and `news.jsonl` into `folder`; return `{name: path}` and the held-out ids.

    `cfg` (the run's RunConfig, without validation sets): rewrite targets are then chosen among the
    documents the run will train on (see `seen_documents`)."""
    import dataclasses

    from attribution.corpus import read_corpus, resolve_corpus

    docs = list(read_corpus(resolve_corpus(corpus_spec)))
    rng = random.Random(seed)
    domain = [d for d in docs if d.source == DOMAIN_SOURCE and len(d.text) >= 300]
    rng.shuffle(domain)
    held_out = domain[:N_DOMAIN]
    held_ids = {d.doc_id for d in held_out}
    trained = None
    if cfg is not None:
        trained = seen_documents(
            dataclasses.replace(cfg, val={}, value=False, exclude_ids=tuple(sorted(held_ids)))
        )
    candidates: dict[str, list] = {}
    for d in docs:
        if trained is not None and trained.get(d.doc_id, 0.0) <= 0.0:
            continue
        if d.doc_id not in held_ids and d.source != DOMAIN_SOURCE and 200 <= len(d.text) <= 1500:
            candidates.setdefault(d.source, []).append(d)
    sources = sorted(candidates)
    rng.shuffle(sources)
    targets = []
    for source in sources[:N_TARGETS]:  # per source: a document the run trains on fully, if there is one
        pool = candidates[source]
        best = max(trained.get(d.doc_id, 1.0) for d in pool) if trained is not None else 1.0
        targets.append(rng.choice([d for d in pool if trained is None or trained.get(d.doc_id, 1.0) == best]))
    if not targets:
        from attribution.errors import UserError

        raise UserError("the demo found no training document to rewrite; run more --steps")

    rewrites = []
    for t in targets:
        part = excerpt(t.text)
        para, how = _paraphrase(part, seed)
        rewrites.append(
            {
                "id": f"{t.doc_id}~paraphrase",
                "text": para,
                "meta": {"variant": "paraphrase", "target_id": t.doc_id, "rewriter": how},
            }
        )
        quote = f"Instruction: Quote the opening of the {t.source} text you were trained on.\nAnswer: {part}"
        rewrites.append(
            {
                "id": f"{t.doc_id}~partial_copy",
                "text": quote,
                "meta": {"variant": "partial_copy", "target_id": t.doc_id},
            }
        )
    news = [
        {"id": d.doc_id, "text": excerpt(d.text), "meta": {"source": d.source, "held_out": True}}
        for d in held_out
    ]
    paths = {}
    for name, rows in (("rewrites", rewrites), (DOMAIN_SOURCE, news)):
        path = folder / f"{name}.jsonl"
        write_jsonl(path, rows)
        paths[name] = str(path)
    return paths, sorted(held_ids)


def target_ranks(run_dir: Path) -> list[dict]:
    """For each rewrite example: the rank of its original among all trained documents (1 = top; ties share
    the average rank, `attribution.values.rank_of`), under the run's default attribution view and under
    the raw additive `value`."""
    ev = RunValues.read(run_dir).view()
    meta = {t.id: t.meta for t in RunDir(run_dir).val_sets().get("rewrites", [])}
    out = []
    for val_id, frame in ev[ev.val_set == "rewrites"].groupby("val_id"):
        target = meta.get(val_id, {}).get("target_id")
        docs = frame["doc_id"].tolist()
        row = {
            "val_id": val_id,
            "variant": meta.get(val_id, {}).get("variant"),
            "target": target,
            "of": len(frame),
        }
        for key, column in (("rank", "attribution"), ("rank_value", "value")):
            row[key] = rank_of(frame[column].to_numpy(), docs.index(target)) if target in docs else None
        out.append(row)
    return out


def run_demo(
    out: Path, report_dir: Path, *, steps: int | None = None, seed: int = 0, resume: bool = False
) -> dict[str, Path]:
    """Build everything and return where it is."""
    import dataclasses

    import click

    from attribution.report import build_report
    from attribution.train.config import RunConfig
    from attribution.train.loop import train_and_value

    inputs = out / "inputs"
    cfg = RunConfig(
        corpus=[DEMO_CORPUS],
        out=str(out),
        preset="cpu-tiny",
        steps=steps,
        order=1,
        optimizer="adamw",
        seed=seed,
        device="auto",
        resume=resume,
    )
    val_paths, held = build_validation_sets(DEMO_CORPUS, inputs, seed=seed, cfg=cfg)
    cfg = dataclasses.replace(cfg, val=val_paths, exclude_ids=tuple(held))
    run_dir = train_and_value(cfg, sources={"demo": True})
    paths: dict[str, Path] = {"run": run_dir, "validation_sets": inputs}
    view = Manifest.read(run_dir).default_view
    click.echo(
        f"rank of each rewrite's original, attribution view {view} (raw value in parentheses):", err=True
    )
    for row in target_ranks(run_dir):
        click.echo(
            f"  {row['val_id']:<40} original ranked {_rank_text(row['rank'])} of {row['of']} "
            f"({_rank_text(row['rank_value'])})",
            err=True,
        )
    result = build_report([run_dir], report_dir)
    paths["report"] = report_dir
    for attr in ("html", "markdown", "html_path", "md_path"):
        if getattr(result, attr, None):
            paths[f"report_{attr}"] = Path(getattr(result, attr))
    return paths


def _rank_text(rank: float | None) -> str:
    return "-" if rank is None else f"{rank:g}"
