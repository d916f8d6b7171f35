"""Peer benchmark (issue 13): EleutherAI Bergson's TrackStar on a finished copyright-experiment run.

Post hoc, on the run's final model only: Bergson 2.5.1 builds projected, Adam-normalized per-sequence
gradients of the run's own training sequences and of the variant texts, and ranks every training
document for every variant text. Two Bergson methods:

- **TrackStar** (`bergson.cli.trackstar.trackstar`, Chang et al. 2024): Adam normalization from the
  run's final AdamW second moments, per-module random projection (`--proj-dim`, 16 by default: a
  16x16 block per module), the mixed train/query autocorrelation matrix R applied as R^(-1/2) to both
  sides, unit normalization (cosine);
- **Adam-normalized cosine** (`bergson.build.build` + `bergson.score.score.score_dataset`): the same
  gradients and unit normalization, without R.

Bergson scores rows, so a training document (cut into the run's `seq_len` sequences by
`attribution.tokens`, exactly as the run trained on it) and a variant text (cut as the run cut its
validation texts) are many rows. A document's score for a text is the **mean over sequences**: the mean
of the sequence-pair scores over the document's sequences and the text's sequences (also reported:
the sum over the document's sequences, still averaged over the text's). Rank of the original and the
control (mean rank of the *other* originals for the same text) follow `attribution.workflows.experiment`
(`rank_of`: 1 = top, ties share the average rank).

Bergson is an optional benchmark dependency (`pip install -e '.[peer]'`, see docs/benchmarks.md for the
CPU-only install, "Session 19") and is imported only here, never by the package or the tests:

    python benchmarks/bergson_peer.py --experiment /tmp/hw/s0 --targets 'hw-b-*' --out peer.md --csv peer.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

# Everything offline: Bergson and transformers must never reach a hub; no W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("partial", "paraphrase", "significant", "similar")
PAPER_COMPONENTS, PAPER_DIM = 1000, 65536  # TrackStar's downweighted components out of its 2^16 dims
METHODS = {
    "trackstar_mean": "Bergson TrackStar (mean over sequences)",
    "cosine_mean": "Bergson, Adam-normalized cosine (mean over sequences)",
    "trackstar_sum": "Bergson TrackStar (sum over the document's sequences)",
    "cosine_sum": "Bergson, Adam-normalized cosine (sum over the document's sequences)",
}


# ---------------------------------------------------------------------------------------------
# The run: model, optimizer state, training sequences, variant texts


def _sequences(texts: list[str], seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Each text's real tokens per sequence, cut as the run cuts documents (EOS appended, `seq_len`
    chunks, a lone trailing token dropped), and each sequence's text row."""
    from attribution.tokens import EOS_ID, chunk_document, encode_texts

    rows, owner = [], []
    for i, ids in enumerate(encode_texts(texts)):
        seq_ids, seq_mask = chunk_document(np.append(ids, np.int32(EOS_ID)), seq_len)
        for s, m in zip(seq_ids, seq_mask, strict=True):
            rows.append([int(t) for t in s[m.astype(bool)]])
            owner.append(i)
    return rows, owner


def _optimizer_pt(model, run_dir: Path, path: Path) -> int:
    """The run's final AdamW second moments as the `optimizer.pt` Bergson reads, each entry with its
    `param_name`. The run's optimizer lists matrices first, then vectors (`build_optimizer`)."""
    import torch
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints"
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    n_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    if sum(n_groups) != len(order):
        raise SystemExit(f"{ckpt}: optimizer has {sum(n_groups)} parameters, the model {len(order)}")
    shapes = dict(named)
    out = {}
    for pid, name in enumerate(order):
        v = tensors[f"state.{pid}.exp_avg_sq"]
        if tuple(v.shape) != tuple(shapes[name].shape):
            raise SystemExit(
                f"{ckpt}: second moment {pid} has shape {tuple(v.shape)}, {name} {tuple(shapes[name].shape)}"
            )
        out[pid] = {"exp_avg_sq": v, "param_name": name}
    torch.save({"state": out, "param_groups": [{"params": list(out)}]}, path)
    return len(out)


def prepare(experiment: Path, work: Path) -> dict:
    """Write the run's final model (HF format, with the GPT-2 tokenizer), its optimizer state and two
    pre-tokenized datasets (training sequences, variant sequences) into `work`; return the row maps."""
    import datasets
    from safetensors.torch import load_model
    from transformers import GPT2TokenizerFast

    from attribution.tokens import tokenizer_files
    from attribution.train.loop import build_model
    from attribution.values import Manifest

    run_dir = experiment / "run-order1"
    cfg = Manifest.read(run_dir).config
    # the run's own architecture (`attribution.train.loop.build_model`), then its final weights
    model = build_model(SimpleNamespace(**cfg), "cpu", "float32")
    load_model(model, str(run_dir / "checkpoints" / "model.safetensors"))
    model.eval()
    model.save_pretrained(work / "model")
    vocab, merges = tokenizer_files()
    tok = GPT2TokenizerFast(
        vocab_file=str(vocab), merges_file=str(merges), model_max_length=int(cfg["seq_len"])
    )
    tok.save_pretrained(work / "model")
    n_moments = _optimizer_pt(model, run_dir, work / "optimizer.pt")

    docs = pd.read_parquet(run_dir / "docs.parquet", columns=["doc_id", "text", "n_seqs"])
    train_rows, train_doc = _sequences(docs["text"].tolist(), int(cfg["seq_len"]))
    n_seqs = np.bincount(train_doc, minlength=len(docs))
    if not np.array_equal(n_seqs, docs["n_seqs"].to_numpy()):
        raise SystemExit(f"{run_dir}: re-tokenized sequence counts differ from the run's docs.parquet")
    records = []
    for kind in KINDS:
        path = experiment / "variants" / f"{kind}.jsonl"
        if path.is_file():
            records += [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    query_rows, query_text = _sequences([r["text"] for r in records], int(cfg["seq_len"]))
    for name, rows in (("train", train_rows), ("query", query_rows)):
        datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]}).save_to_disk(
            str(work / name)
        )
    return {
        "cfg": cfg,
        "doc_ids": docs["doc_id"].astype(str).tolist(),
        "train_doc": np.asarray(train_doc),
        "records": records,
        "query_text": np.asarray(query_text),
        "n_moments": n_moments,
        "n_train_seqs": len(train_rows),
        "n_query_seqs": len(query_rows),
    }


# ---------------------------------------------------------------------------------------------
# Bergson


def _index_cfg(work: Path, run_path: str, data: str, proj_dim: int, seq_len: int):
    from bergson.config.config import DataConfig, IndexConfig

    return IndexConfig(
        run_path=str(work / run_path),
        model=str(work / "model"),
        data=DataConfig(dataset=str(work / data)),
        precision="fp32",
        projection_dim=proj_dim,
        optimizer_state=str(work / "optimizer.pt"),
        token_batch_size=seq_len,  # Bergson refuses more than the model's 64 positions
    )


def mixing_coefficient(path: Path, downweight: int) -> float:
    """The lambda TrackStar mixed R_query and R_train with (Bergson does not record it)."""
    from bergson.gradients import GradientProcessor
    from bergson.utils.math import compute_lambda

    q = GradientProcessor.load(path / "query_hessian")
    i = GradientProcessor.load(path / "value_hessian")
    return float(compute_lambda(q.hessians_eigen, i.hessians_eigen, downweight))


def _score_matrix(path: Path) -> np.ndarray:
    """`[train sequences, query sequences]` scores of a Bergson score directory."""
    from bergson.data import load_scores

    scores = load_scores(path)
    if not scores.is_written():
        raise SystemExit(f"{path}: Bergson left score cells unwritten")
    return np.asarray(scores[:], dtype=np.float64)


def run_bergson(work: Path, proj_dim: int, seq_len: int, downweight: int) -> dict:
    """Score matrices (and seconds) of Bergson's TrackStar pipeline and of its Adam-normalized cosine,
    and TrackStar's mixing coefficient."""
    from bergson.build import build
    from bergson.cli.trackstar import trackstar
    from bergson.config.config import PreprocessConfig, QuerySetConfig, ScoreConfig, TrackstarConfig
    from bergson.score.score import score_dataset

    out = {}
    started = time.perf_counter()
    cfg = _index_cfg(work, "trackstar", "train", proj_dim, seq_len)
    ts = TrackstarConfig(
        query=QuerySetConfig(dataset=str(work / "query"), aggregation="none"),
        preprocess_cfg=PreprocessConfig(unit_normalize=True),
        score_cfg=ScoreConfig(score="individual"),
        target_downweight_components=downweight,
        stats_sample_size=None,  # R_train from every training sequence
    )
    trackstar(cfg, ts)
    out["trackstar"] = (_score_matrix(work / "trackstar" / "scores"), time.perf_counter() - started)
    out["lambda"] = mixing_coefficient(work / "trackstar", downweight)

    started = time.perf_counter()
    build(_index_cfg(work, "cosine_query", "query", proj_dim, seq_len), PreprocessConfig(unit_normalize=True))
    score_dataset(
        _index_cfg(work, "cosine_scores", "train", proj_dim, seq_len),
        ScoreConfig(query_path=str(work / "cosine_query"), score="individual"),
        PreprocessConfig(unit_normalize=True),
    )
    out["cosine"] = (_score_matrix(work / "cosine_scores"), time.perf_counter() - started)
    return out


# ---------------------------------------------------------------------------------------------
# Ranks and the table


def doc_text_scores(m: np.ndarray, train_doc: np.ndarray, query_text: np.ndarray, n_docs: int, n_texts: int):
    """`[documents, texts]` means (and document sums) of a `[train seq, query seq]` score matrix."""
    to_text = np.zeros((m.shape[1], n_texts))
    to_text[np.arange(m.shape[1]), query_text] = 1.0
    per_text = m @ (to_text / to_text.sum(0))  # [train seq, text]: mean over the text's sequences
    to_doc = np.zeros((n_docs, m.shape[0]))
    to_doc[train_doc, np.arange(m.shape[0])] = 1.0
    summed = to_doc @ per_text
    return summed / to_doc.sum(1)[:, None], summed


def ranks_frame(prep: dict, scores: dict[str, np.ndarray], originals: list[str]) -> pd.DataFrame:
    from attribution.values import rank_and_control

    row = {d: i for i, d in enumerate(prep["doc_ids"])}
    missing = [o for o in originals if o not in row]
    if missing:
        raise SystemExit(f"originals missing from the run's training documents: {', '.join(missing)}")
    out = []
    for j, r in enumerate(prep["records"]):
        target = r["meta"]["target_id"]
        item = {"variant": r["meta"]["variant"], "id": r["id"], "target_id": target}
        others = [row[o] for o in originals if o != target]
        for method, s in scores.items():
            item[method], item[f"control_{method}"] = rank_and_control(s[:, j], row[target], others)
        out.append(item)
    return pd.DataFrame(out)


def select(ranks: pd.DataFrame, patterns: list[str]) -> pd.DataFrame:
    """The experiment's own target selection (`attribution.workflows.experiment.select_targets`)."""
    from attribution.errors import UserError
    from attribution.workflows.experiment import select_targets

    try:
        return select_targets(ranks, patterns)
    except UserError as exc:
        raise SystemExit(str(exc)) from exc


def to_markdown(ranks: pd.DataFrame, patterns: list[str], n_docs: int, meta: str) -> str:
    kinds = [k for k in KINDS if k in set(ranks["variant"])]
    n = ranks["target_id"].nunique()
    lines = [
        f"Variants of the originals matching {', '.join(f'`{p}`' for p in patterns)} ({n} originals, "
        f"{len(ranks)} variants). Average rank of the original among {n_docs} training documents "
        f"(1 = top; every rank in brackets). Control: the average rank of the *other* originals for the "
        f"same texts, about {(n_docs + 1) / 2:.0f} for a method that does not simply favour documents like "
        f"the originals. {meta}",
        "",
        "| method | " + " | ".join(kinds) + " | control |",
        "|" + "---|" * (2 + len(kinds)),
    ]
    for method, label in METHODS.items():
        cells = []
        for k in kinds:
            g = ranks.loc[ranks["variant"] == k, method]
            cells.append(f"{g.mean():.1f} [{', '.join(f'{x:g}' for x in g)}]")
        control = ranks.groupby("variant")[f"control_{method}"].mean().mean()
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {control:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--experiment", type=Path, required=True, help="a finished `attribution experiment copyright` folder"
    )
    ap.add_argument(
        "--targets", action="append", default=[], help="fnmatch pattern of original ids (repeatable)"
    )
    ap.add_argument(
        "--proj-dim", type=int, default=16, help="Bergson's per-module projection (a d x d block)"
    )
    ap.add_argument(
        "--downweight",
        type=int,
        default=None,
        help="TrackStar's target_downweight_components (default: the paper's 1000 of 65536, scaled to the total projected dimension)",
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    ap.add_argument("--csv", type=Path, default=None, help="per-variant ranks (every variant, every method)")
    ap.add_argument(
        "--ranks",
        type=Path,
        default=None,
        help="re-tabulate an earlier --csv for other --targets (no Bergson run; its settings come from CSV.json)",
    )
    args = ap.parse_args(argv)
    patterns = args.targets or ["*"]
    if args.ranks:
        info = json.loads(Path(f"{args.ranks}.json").read_text(encoding="utf-8"))
        ranks = pd.read_csv(args.ranks, dtype={"id": str, "target_id": str, "variant": str})
        text = to_markdown(select(ranks, patterns), patterns, info["n_docs"], info["meta"])
        print(text)
        if args.out:
            args.out.write_text(text, encoding="utf-8")
        return 0
    started = time.perf_counter()
    exp = json.loads((args.experiment / "experiment.json").read_text(encoding="utf-8"))
    originals = [str(o) for o in exp["originals"]]

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bergson-peer-")))
        work.mkdir(parents=True, exist_ok=True)
        prep = prepare(args.experiment, work)
        seq_len = int(prep["cfg"]["seq_len"])
        n_modules = 4 * int(prep["cfg"]["n_layer"])  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
        total_dim = n_modules * args.proj_dim**2
        downweight = args.downweight or max(1, round(PAPER_COMPONENTS * total_dim / PAPER_DIM))
        print(
            f"{len(prep['doc_ids'])} documents ({prep['n_train_seqs']} sequences), {len(prep['records'])} texts "
            f"({prep['n_query_seqs']} sequences), {prep['n_moments']} second moments; projection {args.proj_dim} "
            f"({total_dim} dims), downweight {downweight}",
            file=sys.stderr,
        )
        results = run_bergson(work, args.proj_dim, seq_len, downweight)

    n_docs, n_texts = len(prep["doc_ids"]), len(prep["records"])
    scores = {}
    for name in ("trackstar", "cosine"):
        m = results[name][0]
        mean, summed = doc_text_scores(m, prep["train_doc"], prep["query_text"], n_docs, n_texts)
        scores[f"{name}_mean"], scores[f"{name}_sum"] = mean, summed
    ranks = ranks_frame(prep, {k: scores[k] for k in METHODS}, originals)
    seconds = time.perf_counter() - started
    meta = (
        f"Bergson 2.5.1 on the run's final checkpoint ({exp['steps']} steps, seed {exp['seed']}), post hoc: "
        f"projection {args.proj_dim} per module, Adam normalizer from the final AdamW state, unit-normalized; "
        f"TrackStar adds R^(-1/2) of the mixed train/query autocorrelation (downweight {downweight} of "
        f"{total_dim} components: lambda {results['lambda']:.3f}). Wall {seconds:.0f} s "
        f"(TrackStar {results['trackstar'][1]:.0f} s, cosine {results['cosine'][1]:.0f} s)."
    )
    if args.csv:
        ranks.to_csv(args.csv, index=False)
        info = {"n_docs": n_docs, "meta": meta, "seconds": round(seconds, 1), "lambda": results["lambda"]}
        Path(f"{args.csv}.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    text = to_markdown(select(ranks, patterns), patterns, n_docs, meta)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(f"wall time: {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
