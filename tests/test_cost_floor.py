"""The valued step's memory model (attribution.engine.memory) against the tensors the Valuer holds, and
the per-component cost-floor benchmark (benchmarks/cost_floor.py) on the demo shape."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attribution.engine import ValSet, Valuer
from attribution.engine.memory import (
    BEFORE,
    PRE,
    SCORES,
    SIDE,
    TRAIN,
    TRANSIENT,
    held_bytes,
    step_memory,
    use_tensors,
)
from attribution.engine.optimizer import adam_preconditioner
from attribution.engine.strategies.materialize import materialize

VOCAB = 97


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )


def _sets() -> dict[str, ValSet]:
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(long)
    mask[2, 7:] = 0
    return {"each": ValSet(long, mask), "whole": ValSet(torch.randint(0, VOCAB, (2, 6), generator=g))}


def _side_tensors(side) -> list:
    return [x for cap, _ in side.ghost for x in use_tensors(cap.uses)] + list(side.dense.values())


@pytest.mark.parametrize(
    ("strategy", "n"),
    [
        (None, 4),
        (None, 1),
        ("project", 4),
        ("ghost", 4),
        ({"*": "materialize", "transformer.wte": "kronecker"}, 4),
    ],
)
def test_memory_terms_equal_held_tensors(strategy, n) -> None:
    """Every term of the model is the byte count of the tensors the Valuer actually holds for it."""
    model = _model()
    sets = _sets()
    valuer = Valuer(model, sets, per_example=["each"], strategy=strategy, grad_norms=True)
    ids = torch.randint(0, VOCAB, (n, 10), generator=torch.Generator().manual_seed(2))
    valuer.forward_backward(ids)
    mem = step_memory(valuer.plans(), grad_norms=True, per_example=["each"])
    assert mem.get(TRAIN) == held_bytes(use_tensors(valuer._train.uses))
    sv = valuer.values(0.1)
    for name in sets:
        assert mem.get(SIDE, name) == held_bytes(_side_tensors(valuer._cache[name][1])), name
        arrays = [sv.per_set[name], *([sv.per_example[name]] if name in sv.per_example else [])]
        assert mem.get(SCORES, name) == sum(a.nbytes for a in arrays)
    assert mem.total > mem.get(TRAIN) > 0
    assert "| **total** |" in str(mem)


def test_scoring_transient_is_what_scoring_allocates_beyond_the_side() -> None:
    """Under `materialize`, scoring one parameter allocates its per-sample training gradients `[n, P0, P1]`
    (the validation gradient it is dotted with is the side's, counted there): the transient is the
    largest of them, for one set; sets scored together add the stacked copy of their G's."""
    model = _model()
    sets = _sets()
    valuer = Valuer(model, {"each": sets["each"]}, per_example=["each"], strategy="materialize")
    valuer.forward_backward(torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)))
    train = valuer._train
    largest = max(
        materialize(uses, valuer.shapes[pid], True, torch.float32).nbytes for pid, uses in train.uses.items()
    )
    assert step_memory(valuer.plans(), per_example=["each"]).get(TRANSIENT) == largest
    both = Valuer(_model(), sets, per_example=["each"], strategy="materialize")
    both.forward_backward(torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)))
    stacked = max(
        (len(sets["each"]) + 1) * p0 * p1 * 4 + 4 * p0 * p1 * 4 for p0, p1 in both.shapes.values()
    )  # 3 examples of "each" + the whole of "whole", and 4 training samples
    assert step_memory(both.plans(), per_example=["each"]).get(TRANSIENT) == stacked


def test_scoring_in_blocks_of_parameter_rows_gives_the_same_scores(monkeypatch) -> None:
    """`materialize` scores the per-sample gradients of `score_block` parameter rows at a time (the tied
    head's `[n, V, d]` was the step's largest transient): the same scores as all rows at once (float64; each
    block adds only its own embedding tokens, a partial last block included), and the memory model's
    transient is the block's."""
    from attribution.engine.strategies import materialize as mat

    model = _model().double()
    valuer = Valuer(model, {"each": _sets()["each"]}, per_example=["each"], strategy="materialize")
    n = 5
    ids = torch.randint(0, VOCAB, (n, 10), generator=torch.Generator().manual_seed(4))
    ids[0, :3] = torch.tensor([VOCAB - 1, VOCAB - 2, VOCAB - 2])  # the last, partial block of rows
    ids[3, 4] = ids[1, 2]  # one row in two samples
    valuer.forward_backward(ids)
    train, side = valuer._train, valuer._val_side("each")[0]
    shapes = valuer.shapes

    def scores() -> dict:
        return {
            pid: mat.score_materialized(u, shapes[pid], side.dense[pid], torch.float64)
            for pid, u in train.uses.items()
        }

    whole = scores()
    monkeypatch.setattr(mat, "SCORE_BLOCK_BYTES", n * 16 * 8 * 5)  # 5 rows of a 16-wide parameter
    assert mat.score_block(n, (VOCAB, 16), 8) == 5 and mat.score_block(n, (16, 64), 8) == 1
    assert VOCAB % 5 > 1  # a last block of more than one row
    for pid, got in scores().items():
        torch.testing.assert_close(got, whole[pid], rtol=1e-12, atol=1e-14 * float(whole[pid].abs().max()))
    assert max(float(w.abs().max()) for w in whole.values()) > 0
    valuer._plan_key = None  # re-plan: the cost model reads the block
    valuer._plan(train)
    block = max(n * mat.score_block(n, shape, 8) * shape[1] * 8 for shape in shapes.values())
    assert step_memory(valuer.plans(), per_example=["each"], itemsize=8).get(TRANSIENT) == block


def test_memory_order2_and_optimizer_aware() -> None:
    """Second order holds the 'before' side while the 'after' one is built, and combines and
    preconditions in place (no third copy); optimizer-aware values hold one float per parameter."""
    model = _model()
    sets = _sets()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    valuer = Valuer(model, sets, order=2, optimizer_aware=True, per_example=["each"])
    valuer.forward_backward(torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(3)))
    params = {pid: p for pid, (_, p) in valuer.capturer.params.items()}
    pre = adam_preconditioner(opt, params, batch_size=4)
    assert valuer.values(0.1, optimizer=opt) is None
    mem = step_memory(valuer.plans(), order=2, optimizer_aware=True, per_example=["each"])
    assert mem.get(PRE) == held_bytes(pre.values())
    before = valuer._pending["sides"]
    expected = {}
    opt.step()
    for name in sets:
        assert mem.get(BEFORE, name) == held_bytes(_side_tensors(before[name]))
        after = valuer._val_side(name)[0]
        expected[name] = before[name].combine(after, 0.5, 0.5).precondition(pre)
    assert valuer.after_step() is not None
    # the "before" buffers now hold the preconditioned trapezoid: nothing else was allocated
    for name in sets:
        for pid, g in expected[name].dense.items():
            assert torch.equal(before[name].dense[pid], g)
    plan = valuer.plans()["each"]
    alone = step_memory({"each": plan}, order=2, optimizer_aware=True, per_example=["each"])
    assert alone.get(BEFORE, "each") == mem.get(BEFORE, "each")  # one set's model needs no other set


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_floor.py"
    spec = importlib.util.spec_from_file_location("cost_floor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_table(args: list[str], tmp_path, capsys) -> dict:
    bench = _load_benchmark()
    out = tmp_path / "floor.json"
    res = bench.main(
        [*args, "--rounds", "1", "--warmup-rounds", "0", "--rate-seconds", "0", "--json", str(out)]
    )
    table = capsys.readouterr().out
    for component in bench.COMPONENTS:
        assert f"| {component}" in table, component
        assert any(r["component"].startswith(component) for r in res["components"]), component
    assert "| whole valued step" in table and "| **total** |" in table
    for r in res["components"]:
        assert r["seconds"] > 0 and r["flops"] > 0 and r["floor_s"] > 0 and r["measured_over_floor"] > 0, r
        # the softmax floor adds one exp per logit to the passes that compute a loss, nothing elsewhere
        passes = r["component"].startswith(("plain", "train", "validation"))
        assert (r["exps"] > 0) == passes and r["floor_with_softmax_s"] >= r["floor_s"], r
    assert res["exp_per_s"] > 0 and res["valued_over_sum_of_floors_with_softmax"] > 0
    assert res["gemm_flops_per_s"] > 0 and res["valued_over_plain"] > 0 and res["memory"]["total"] > 0
    assert json.loads(out.read_text())["shape"]["n_layer"] == 2
    return res


def test_cost_floor_table_small_vocabulary(tmp_path, capsys) -> None:
    """The demo shape with a 500-token vocabulary, second order, AdamW-aware and with the in-run cosines'
    norms: every component runs, and without the norms they are out of the step."""
    args = ["--shape", "demo", "--vocab", "500", "--order", "2", "--optimizer-aware"]
    res = _check_table([*args, "--grad-norms"], tmp_path, capsys)
    assert all(r["in_step"] for r in res["components"])
    lean = _check_table(args, tmp_path, capsys)
    assert [r["component"] for r in lean["components"] if not r["in_step"]] == ["gradient norms"]


@pytest.mark.slow  # ~45 s on the shared 2-core machine: the real 50,257-token head dominates
def test_cost_floor_demo_table(tmp_path, capsys) -> None:
    """The demo shape itself, one round: every component in the table, with positive numbers."""
    res = _check_table(["--shape", "demo"], tmp_path, capsys)
    assert res["shape"]["val_sets"]["news"]["sequences"] == 8


def test_rows_shared_by_layers_sum_them_and_padding_is_not_counted(capsys) -> None:
    """A row such as `h.*.mlp.c_fc.weight` is every layer's scoring, summed within a round (two layers: twice
    one layer's FLOPs, over two rounds and a warm-up round as over one), and the validation pass counts the
    columns the Valuer computes: texts of 60 tokens cost the same in 64- and 128-token rows (the trim)."""
    bench = _load_benchmark()
    base = ["--shape", "demo", "--vocab", "500", "--sketch-dim", "0", "--rate-seconds", "0"]
    results = []

    def flops(*extra: str) -> dict[str, float]:
        res = bench.main([*base, "--warmup-rounds", "0", *extra])
        capsys.readouterr()
        results.append(res)
        return {r["component"]: r["flops"] for r in res["components"]}

    one, two = (
        flops("--n-layer", "1", "--rounds", "1"),
        flops("--n-layer", "2", "--rounds", "2", "--warmup-rounds", "1"),
    )
    # the warm-up round is run and dropped: two counted rounds of each whole step
    assert {k: len(v) for k, v in results[-1]["minor_page_faults"].items()} == {"plain": 2, "valued": 2}
    layered = [k for k in one if k.startswith("scoring") and " h.*." in k]
    assert len(layered) >= 4, sorted(one)
    for key in layered:
        assert two[key] == pytest.approx(2 * one[key], rel=1e-12), key
    short, long = flops("--seq-len", "64", "--rounds", "1"), flops("--seq-len", "128", "--rounds", "1")
    padded = flops("--seq-len", "128", "--rounds", "1", "--no-trim")
    val = [k for k in short if k.startswith("validation forward/backward")]
    assert len(val) == 2
    for key in val:
        assert long[key] == pytest.approx(short[key], rel=1e-12), key
        assert padded[key] > 2 * long[key], key  # --no-trim: 128-token rows, as before the trim
