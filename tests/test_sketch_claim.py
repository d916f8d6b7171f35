"""`attribution claim --fast` end to end on a test-micro run: sketch index, candidates, exact confirmation."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from attribution.errors import UserError
from attribution.train.config import RunConfig
from attribution.train.sketch import DEFAULT_DIM, make_index, read_sketch
from attribution.values.results import RunValues
from attribution.workflows.claim import claim
from attribution.workflows.claim_fast import estimate, fast_claim
from tests.test_claim_replay import _claims, _run, _texts
from tests.train_fixtures import write_corpus, write_val

DIM = RunConfig().sketch_dim


def test_the_config_default_is_the_sketch_default():
    assert DIM == DEFAULT_DIM


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    return tmp


@pytest.fixture(scope="module")
def run(corpus_dir):
    """SGD-proxy values: the fidelity test below is of the SGD-weighted sketch, which tracks exact values;
    the optimizer-aware sketch does not yet (docs/benchmarks.md, "Sketch fidelity under optimizer-aware
    values"), and `aware_run` checks its arithmetic instead."""
    return _run(corpus_dir, "base", optimizer_aware=False)


@pytest.fixture(scope="module")
def texts(corpus_dir):
    return _texts(corpus_dir / "claims.jsonl", _claims(corpus_dir))


@pytest.fixture(scope="module")
def full(run, texts, tmp_path_factory):
    """The full exact replay of every document, to compare the confirmations with (with the in-run
    cosines, which the run itself skips beside its checkpoint view and `--view standout_cosine` asks for)."""
    out = tmp_path_factory.mktemp("full") / "claim"
    return claim(run, texts, out, report=False, progress=False, in_run_cosine=True)


def test_the_run_writes_the_sketch_index(run):
    import faiss

    meta = json.loads((run / "sketch" / "meta.json").read_text())
    docs = pd.read_parquet(run / "docs.parquet")
    assert meta["dim"] == DIM and meta["segments"] == [[0, 2], [2, 4], [4, 6]]
    values = pd.read_parquet(run / "doc_values.parquet")
    trained = set(values.loc[values["n_seen"] > 0, "doc_id"].astype(str))
    order = docs["doc_id"].astype(str)
    assert 0 < len(trained) < len(docs), "the 6 steps leave some documents untrained: they get no vector"
    assert meta["doc_ids"] == order[order.isin(trained)].tolist()
    raw, unit = (faiss.read_index(str(run / "sketch" / f)) for f in ("index.faiss", "index_unit.faiss"))
    assert raw.ntotal == unit.ntotal == len(trained) and raw.d == unit.d == DIM
    sketch = read_sketch(run)
    # float16 storage: each entry is rounded to 2**-11 relative, so a norm is within a few of that
    np.testing.assert_allclose(np.linalg.norm(sketch.vectors("unit"), axis=1), 1.0, rtol=4 * 2**-11)
    raw_vectors = sketch.vectors("raw")
    assert np.abs(raw_vectors).max() == pytest.approx(sketch.scale("raw"), rel=2**-11)


def test_float16_index_keeps_tiny_vectors_and_the_float32_ranking():
    """Sketch entries are far below float16's smallest normal; the stored scale keeps them and the ranks."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)) * 1e-9
    q = rng.standard_normal((3, 32)).astype(np.float32)
    index, scale = make_index(x)
    assert scale == pytest.approx(np.abs(x).max())
    scores, rows = index.search(q, 10)
    exact = q.astype(np.float64) @ x.T
    flat = faiss.IndexFlatIP(32)
    flat.add((x / scale).astype(np.float32))
    _, want = flat.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, want, strict=True)]) >= 0.9
    top = np.take_along_axis(exact, rows.astype(np.int64), 1)
    # each stored entry is within 2**-11 of its value relative to the scale: bound the inner product by it
    bound = 2**-11 * np.abs(q).sum(1, keepdims=True) * scale
    assert (np.abs(scores * scale - top) <= bound).all()


@pytest.mark.parametrize("view", ["value", "contrast_per_token", "standout_cosine"])
def test_fast_candidates_are_confirmed_with_the_full_replay_values_bitwise(run, texts, full, tmp_path, view):
    r = fast_claim(run, texts, tmp_path / "fast", k=4, view=view, progress=False)
    assert r.confirmed and r.view == view
    table = pd.read_csv(tmp_path / "fast" / "fast.csv")
    assert table.groupby("claim_id").size().to_dict() == {"c1": 4, "c2": 4}
    want = RunValues.read(full).view(view).query("val_set == 'claims'").set_index(["val_id", "doc_id"])
    got = r.table.set_index(["claim_id", "doc_id"])
    assert (got["exact_value"].to_numpy() == want.loc[got.index, "value"].to_numpy()).all()
    assert (got["exact"].to_numpy() == want.loc[got.index, "attribution"].to_numpy()).all()
    assert set(r.table["exact_rank"]) <= {1, 1.5, 2, 2.5, 3, 3.5, 4}
    assert "exact_rank" in (tmp_path / "fast" / "fast.md").read_text()


def test_raw_estimates_track_the_exact_values(run, texts, full):
    """Over all documents the sketch estimate ranks like the exact raw value (the fidelity the index is for)."""
    est, _, _, _ = estimate(run, texts, view="value")
    exact = RunValues.read(full).view("value").query("val_set == 'claims'")
    both = est.merge(exact.rename(columns={"val_id": "claim_id"}), on=["claim_id", "doc_id"])
    assert len(both) == len(est) > 10
    for _, g in both.groupby("claim_id"):
        assert g["estimate"].corr(g["value"], method="spearman") > 0.5
        scale = g["value"].abs().max()
        assert (g["estimate"] - g["value"]).abs().max() < scale  # same units: a value, not a cosine


@pytest.mark.parametrize("view", ["standout", "standout_cosine"])
def test_the_standout_views_are_linear_in_the_scaled_sketch(view):
    """`<u_d / sd_d, q_t - mean_r q_r>` is the exact standout z (`views.standout`) of the scores
    `<u_d, q>` (unit-normalized for the cosine view): the algebra the fast path relies on, in float64."""
    from attribution.values import views
    from attribution.workflows.claim_fast import _standout_vectors, _unit, rank_queries

    rng = np.random.default_rng(5)
    u, refs, claims = rng.normal(size=(7, 6)), rng.normal(size=(5, 6)), rng.normal(size=(3, 6))
    u[3] = 0.0  # a document never trained on: no spread, z 0

    class Sketch:
        def vectors(self, kind):
            return _unit(u) if kind == "unit" else u

    got = (_standout_vectors(Sketch(), view, refs) @ rank_queries(claims, refs, view).T).T  # [claims, docs]
    q = (lambda x: _unit(x)) if "cosine" in view else (lambda x: x)
    doc_vecs = Sketch().vectors("unit" if "cosine" in view else "raw")
    rows = [
        (f"d{d}", name, f"{name}{j}", float(doc_vecs[d] @ q(x)[j]))
        for name, x in (("reference", refs), ("claims", claims))
        for j in range(len(x))
        for d in range(len(u))
    ]
    ev = pd.DataFrame(rows, columns=["doc_id", "val_set", "val_id", "value"])
    z = views.standout(ev).to_numpy()[ev["val_set"].to_numpy() == "claims"].reshape(len(claims), len(u))
    np.testing.assert_allclose(np.nan_to_num(z, nan=0.0), got, rtol=1e-10, atol=1e-12)
    assert np.isnan(z[:, 3]).all() and (got[:, 3] == 0).all()


def test_a_run_without_chain_answers_with_estimates_only(corpus_dir, texts, tmp_path):
    run = _run(corpus_dir, "nochain", keep_every=0)
    r = fast_claim(run, texts, tmp_path / "est", k=3, progress=False)
    assert not r.confirmed and "exact" not in r.table.columns and len(r.table) == 6
    assert any("no replay chain" in n for n in r.notes)
    assert "estimates only" in (tmp_path / "est" / "fast.md").read_text()


def test_missing_index_and_dimension_mismatch_are_one_line_errors(corpus_dir, run, texts, tmp_path):
    import faiss

    from attribution.cli import main

    plain = _run(corpus_dir, "nosketch", sketch=False)
    with pytest.raises(UserError, match="no sketch index"):
        fast_claim(plain, texts, tmp_path / "o1", progress=False)
    res = CliRunner().invoke(
        main, ["claim", str(plain), "--texts", str(texts), "--out", str(tmp_path / "o2"), "--fast"]
    )
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "no sketch index" in res.output
    args = [
        "claim",
        str(run),
        "--texts",
        str(texts),
        "--out",
        str(tmp_path / "o4"),
        "--fast",
        "--in-run-cosine",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--in-run-cosine is for the exact replay" in res.output
    assert not (tmp_path / "o4").exists()

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    index = faiss.IndexFlatIP(8)
    index.add(
        np.zeros((len(json.loads((run / "sketch" / "meta.json").read_text())["doc_ids"]), 8), np.float32)
    )
    faiss.write_index(index, str(copy / "sketch" / "index.faiss"))
    with pytest.raises(UserError, match=rf"index\.faiss: index holds .* dimension 8.*dimension {DIM}"):
        fast_claim(copy, texts, tmp_path / "o3", view="value", progress=False)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["sketch_dim"] = 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"sketch dimension {DIM} differs from the run's --sketch-dim 64"):
        fast_claim(copy, texts, tmp_path / "o4", progress=False)


def test_cli_fast(run, texts, tmp_path):
    from attribution.cli import main

    res = CliRunner().invoke(
        main,
        [
            "claim",
            str(run),
            "--texts",
            str(texts),
            "--out",
            str(tmp_path / "f"),
            "--fast",
            "--k",
            "2",
            "--view",
            "cosine",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "confirmed by targeted exact replay" in res.output
    assert len(pd.read_csv(tmp_path / "f" / "fast.csv")) == 4


def test_the_sketch_survives_a_resume_from_the_checkpoint(corpus_dir, run, tmp_path):
    """The accumulator rides in the checkpoint: resuming the finished run rewrites the same index bitwise."""
    from attribution.train import RunConfig, train_and_value

    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    (copy / "sketch" / "index.faiss").unlink()
    cfg = RunConfig(
        **{**json.loads((run / "manifest.json").read_text())["config"], "out": str(copy), "resume": True}
    )
    train_and_value(cfg)

    def vectors(path):
        return read_sketch(path).vectors("raw")

    want = vectors(run)
    assert np.abs(want).max() > 0 and (vectors(copy) == want).all()


def test_sketch_kind_and_size_are_the_runs_and_the_claims(corpus_dir, texts, tmp_path):
    """`--sketch-kind` with `--sketch-side` / `--sketch-width` reach the projection, are recorded in the
    meta, and claim --fast reads them back."""
    narrow = _run(
        corpus_dir, "side4", sketch_kind="kronecker", sketch_mix="segment", sketch_side=4, sketch_dim=32
    )
    sketch = read_sketch(narrow)
    assert sketch.meta["kind"] == "kronecker" and sketch.meta["side"] == 4 and sketch.projection().side == 4
    assert sketch.meta["mix"] == "segment" and sketch.projection().mix_kind == "segment"
    assert max(max(x["block"]) for x in sketch.meta["layers"]) == 4
    table, _, _, _ = estimate(narrow, texts, view="value")
    assert table["estimate"].abs().max() > 0
    thin = _run(corpus_dir, "width64", sketch_width=64, sketch_dim=32)
    sketch = read_sketch(thin)
    assert sketch.meta["kind"] == "tensor" and sketch.meta["width"] == 64 and sketch.projection().width == 64
    assert sketch.meta["mix"] == "shared" and sketch.projection().mix_kind == "shared"  # the defaults
    table, _, _, _ = estimate(thin, texts, view="value")
    assert table["estimate"].abs().max() > 0
    with pytest.raises(UserError, match="--sketch-width sets the tensor"):
        _run(corpus_dir, "bad", sketch_kind="kronecker", sketch_width=64)


def test_no_confirm_stops_at_the_estimates(run, texts, tmp_path):
    from attribution.cli import main

    res = CliRunner().invoke(
        main,
        [
            "claim",
            str(run),
            "--texts",
            str(texts),
            "--out",
            str(tmp_path / "nc"),
            "--fast",
            "--k",
            "2",
            "--no-confirm",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "estimates only (--no-confirm)" in res.output
    table = pd.read_csv(tmp_path / "nc" / "fast.csv")
    assert "exact" not in table.columns and len(table) == 2 * table["claim_id"].nunique()
    assert not (tmp_path / "nc" / "replay").exists()


@pytest.fixture(scope="module")
def aware_run(corpus_dir):
    return _run(corpus_dir, "aware", optimizer_aware=True, dtype="float64", sketch_dim=64)


def _query(run, texts):
    from attribution.values.manifest import Manifest
    from attribution.workflows.claim_fast import _config, _texts, query_vectors

    cfg = _config(Manifest.read(run))
    return query_vectors(run, cfg, read_sketch(run), _texts(run, cfg, texts, False))


def test_optimizer_aware_claims_are_preconditioned_with_each_checkpoints_adam_k(
    aware_run, texts, monkeypatch
):
    """Brute force: mean over segments of the trapezoid of `M_s P ((K_b / F_b) * g(w_b))`, with autograd's
    per-text gradient at each kept checkpoint b, K from b's optimizer state (step 0: the next checkpoint's)
    and F_b = balance(K_b), the document side's share of the split."""
    import torch

    from attribution.engine.rules import canonical_shape, trainable_params
    from attribution.engine.task import LanguageModelingTask
    from attribution.train import chain, loop
    from attribution.train.sketch import BALANCED, balanced_claim_side
    from attribution.values.manifest import Manifest
    from attribution.workflows import claim_fast
    from attribution.workflows.claim_fast import _config, _texts, link_preconditioner

    got, notes = _query(aware_run, texts)
    assert any("preconditioned" in n for n in notes)
    cfg = _config(Manifest.read(aware_run))
    sketch = read_sketch(aware_run)
    proj, segs = sketch.projection(), sketch.segments
    data = _texts(aware_run, cfg, texts, False)["claims"]
    model = loop.build_model(cfg, "cpu", "float64")
    opt = loop.build_optimizer(model, cfg)
    links = {lk.step: lk for lk in chain.links(aware_run)}
    bounds = sorted({a for a, _ in segs} | {b for _, b in segs})
    ks = {}
    for b in bounds[::-1]:
        chain.load_link(links[b], model, opt)
        ks[b] = link_preconditioner(model, opt) if b else ks[bounds[1]]
    # the run's documents carry balance(K_t), so each checkpoint's claim side is K / balance(K)
    assert sketch.meta["preconditioner"] == BALANCED
    ks = {
        b: balanced_claim_side(k, {pid: p for pid, (_, p) in trainable_params(model).items()})
        for b, k in ks.items()
    }
    want = np.zeros_like(got["claims"])
    params = trainable_params(model)
    for b in bounds:
        chain.load_link(links[b], model, opt)
        for j in range(len(data.docs)):
            rows = np.flatnonzero(data.seq_doc == j)
            loss = LanguageModelingTask().per_sequence_loss(
                model, torch.from_numpy(data.ids[rows]), torch.from_numpy(data.mask[rows])
            )
            gs = torch.autograd.grad(loss.sum(), [p for _, p in params.values()], allow_unused=True)
            dense = {
                name: (ks[b][pid] * (torch.zeros_like(p) if g is None else g)).reshape(canonical_shape(p))
                for (pid, (name, p)), g in zip(params.items(), gs, strict=True)
            }
            for s, (a, e) in enumerate(segs):
                if b in (a, e):
                    want[j] += 0.5 * proj.apply_dense(dense, s).numpy()
    if proj.mix_kind == "shared":  # one mix for every segment: the claim side is the mean over segments
        want /= len(segs)
    assert sketch.meta["mix"] == "shared" and np.abs(want).max() > 0
    np.testing.assert_allclose(got["claims"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # and K = 1 gives the factor path's (unpreconditioned) vectors
    monkeypatch.setattr(
        claim_fast,
        "link_preconditioner",
        lambda m, o: {pid: torch.ones_like(p) for pid, (_, p) in trainable_params(m).items()},
    )
    ones, _ = _query(aware_run, texts)
    plain = claim_fast.query_vectors(
        aware_run,
        dataclasses.replace(cfg, optimizer_aware=False),
        sketch,
        _texts(aware_run, cfg, texts, False),
    )[0]
    np.testing.assert_allclose(
        ones["claims"], plain["claims"], rtol=1e-9, atol=1e-12 * np.abs(plain["claims"]).max()
    )


def test_a_checkpoint_default_view_is_ranked_by_the_checkpoint_index(run, texts):
    """The run's default view reads the checkpoint cosines: the fast path ranks by it from the checkpoint
    index (tests/test_checkpoint_sketch.py), not by the in-run sketch."""
    from attribution.values.manifest import Manifest
    from attribution.values.views import DEFAULT_VIEW, IN_RUN_VIEW
    from attribution.workflows.claim_fast import estimate

    assert Manifest.read(run).default_view == DEFAULT_VIEW != IN_RUN_VIEW
    table, view, notes, _ = estimate(run, texts, k=3)
    assert view == DEFAULT_VIEW and not notes and len(table) == 3 * table["claim_id"].nunique()
