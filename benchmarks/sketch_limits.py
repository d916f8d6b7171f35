"""What limits `claim --fast` under optimizer-aware values: the sketch's approximation without projection,
and the projection alone, both against exact values.

After a run with a replay chain and a full exact replay of some claim texts (`attribution claim RUN
--texts claims.jsonl --out EXACT`, or `benchmarks/sketch_fidelity.py --claims`, which writes OUT/full):

    .venv/bin/python benchmarks/sketch_limits.py --run runs/demo --claims claims.jsonl --exact OUT/full

For every trained document and claim, with Adam's K of each kept link split as the sketch splits it
(`attribution.train.sketch.balance`: claims carry K / F, documents F), dense and exact in float32:
1. `links, weighted`: sum over links of <(K/F) g_claim(w_link), F g_doc(w_link)> times half the learning
   rate of each step the document was trained in the segments next to the link: the sketch's estimate with
   no projection, except that the document's gradient is taken at the link, not at its own step;
2. `links, unweighted`: the same over every link regardless of when the document was trained (TrackStar's
   recipe at the kept checkpoints);
3. `projected at link L, KIND`: the dense scores of one link (`--link`) against the same vectors passed
   through the run's projection of each kind (dim `--dim`): what the projection alone costs.
Printed per method: mean Spearman with the exact raw value (methods 1-2) or with the dense scores (3),
and the claim's original's rank (texts with a `meta.target_id`). A document's gradient is the sum of its
first `--max-seqs` sequences' losses from its own text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def _rank(scores: pd.Series, target: str) -> int:
    return int((scores > scores[target]).sum() + 1)


def _compare(claims: list[dict], docs: list[str], got, want) -> tuple[float, list[int], list[int]]:
    """(mean Spearman of `got` with `want`, the original's rank under each): `got[i]` and `want(i)` are
    claim i's scores over `docs`."""
    sp, rk, rk_want = [], [], []
    for i, c in enumerate(claims):
        a, b = pd.Series(got[i], index=docs), pd.Series(want(i), index=docs)
        sp.append(a.corr(b, method="spearman"))
        target = (c.get("meta") or {}).get("target_id")
        if target in a.index:
            rk.append(_rank(a, target))
            rk_want.append(_rank(b, target))
    return float(np.mean(sp)), rk, rk_want


def main() -> None:
    import torch

    from attribution.corpus import read_corpus, resolve_corpus
    from attribution.engine.rules import canonical_shape, trainable_params
    from attribution.engine.task import LanguageModelingTask
    from attribution.tokens import load_tokenizer
    from attribution.train import chain, loop
    from attribution.train.sketch import balance, make_projection, model_params, read_sketch
    from attribution.values.manifest import Manifest
    from attribution.values.results import RunValues
    from attribution.values.rundir import RunDir
    from attribution.workflows.claim_fast import _config, link_preconditioner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--claims", type=Path, required=True, help="JSONL claim texts (with meta.target_id)")
    ap.add_argument("--exact", type=Path, required=True, help="the full exact replay of --claims (a run dir)")
    ap.add_argument(
        "--link", type=int, default=None, help="kept link for the projection test (default: middle)"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--max-seqs", type=int, default=8)
    args = ap.parse_args()

    cfg = _config(Manifest.read(args.run))
    model = loop.build_model(cfg, "cpu", "float32")
    optimizer = loop.build_optimizer(model, cfg)
    links = {lk.step: lk for lk in chain.links(args.run)}
    if len(links) < 2:
        raise SystemExit(f"{args.run}: needs a replay chain of at least two kept links")
    steps = sorted(links)
    params = trainable_params(model)
    shapes = model_params(model)[0]
    tok, task = load_tokenizer(), LanguageModelingTask()
    texts = {d.doc_id: d.text for p in cfg.corpus for d in read_corpus(resolve_corpus(p))}
    trained = [d for d in read_sketch(args.run).meta["doc_ids"] if d in texts]
    claims = [
        json.loads(line) for line in args.claims.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    seen = RunDir(args.run).table("step_values.parquet", required=True)[["step", "doc_id"]].drop_duplicates()
    log = pd.read_csv(args.run / "train_log.csv").dropna(subset=["lr"])
    lr = np.interp(np.arange(1, steps[-1] + 1), log["step"], log["lr"])

    def grad(text: str) -> dict:
        ids = tok.encode(text).ids
        model.zero_grad(set_to_none=True)
        for start in range(0, min(len(ids), args.max_seqs * cfg.seq_len), cfg.seq_len):
            chunk = ids[start : start + cfg.seq_len]
            if len(chunk) > 1:
                i = torch.tensor([chunk])
                task.per_sequence_loss(model, i, torch.ones_like(i)).sum().backward()
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(canonical_shape(p))
            for _, (name, p) in params.items()
        }

    def split() -> tuple[dict, dict]:
        k = link_preconditioner(model, optimizer)
        kf, f = {}, {}
        for pid, (name, p) in params.items():
            kk = k[pid].reshape(canonical_shape(p))
            f[name] = torch.outer(*balance(kk)).to(kk.dtype)
            kf[name] = kk / f[name]
        return kf, f

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[n].flatten() for n in shapes])

    chain.load_link(links[steps[1]], model, optimizer)
    first = split()  # the step-0 link has no Adam state yet: it takes the next link's K, as claim --fast does
    weighted = np.zeros((len(claims), len(trained)))
    unweighted = np.zeros_like(weighted)
    middle = args.link if args.link is not None else steps[len(steps) // 2]
    kept: tuple | None = None
    for s in steps:
        chain.load_link(links[s], model, optimizer)
        kf, f = first if s == steps[0] else split()
        claim_side = [{n: kf[n] * g for n, g in grad(c["text"]).items()} for c in claims]
        u = torch.stack([flat(x) for x in claim_side])
        lo = max([b for b in steps if b < s], default=s)
        hi = min([b for b in steps if b > s], default=s)
        near = seen[(seen.step > lo) & (seen.step <= hi)].assign(w=lambda x: 0.5 * lr[x.step - 1])
        weight = near.groupby("doc_id")["w"].sum()
        doc_sides = {}
        for j, d in enumerate(trained):
            w = {n: f[n] * g for n, g in grad(texts[d]).items()}
            score = (u @ flat(w)).numpy()
            unweighted[:, j] += score
            weighted[:, j] += score * weight.get(d, 0.0)
            if s == middle:
                doc_sides[d] = w
        if s == middle:
            kept = (claim_side, doc_sides, u)
        print(f"link {s} done", flush=True)

    exact = RunValues.read(args.exact).view("value").query("val_set == 'claims'")

    def exact_of(i: int) -> np.ndarray:
        rows = exact[exact.val_id == claims[i]["id"]].set_index("doc_id")["value"]
        return rows.reindex(trained).to_numpy()

    for name, m in (("links, weighted", weighted), ("links, unweighted", unweighted)):
        sp, rk, rk_exact = _compare(claims, trained, m, exact_of)
        print(f"{name}: Spearman with the exact value {sp:.3f}; original's rank {rk} (exact {rk_exact})")

    claim_side, doc_sides, u = kept
    dense = np.stack([(u @ flat(doc_sides[d])).numpy() for d in trained], axis=1)
    for kind in ("kronecker", "tensor"):
        proj = make_projection(shapes, args.dim, cfg.seed, kind)
        up = torch.stack([proj.apply_dense(x, 0) for x in claim_side])
        est = np.stack([(up @ proj.apply_dense(doc_sides[d], 0)).numpy() for d in trained], axis=1)
        sp, rk, rk_dense = _compare(claims, trained, est, lambda i: dense[i])
        print(
            f"projected at link {middle}, {kind} (width {proj.width}, dim {args.dim}): Spearman with the dense "
            f"scores {sp:.3f}; original's rank {rk} (dense {rk_dense})"
        )


if __name__ == "__main__":
    main()
