"""step_values against exact per-step Shapley (all 2^8 subsets of a batch of 8), SGD and AdamW.

Prints the tables that docs/benchmarks.md quotes (run with -s to see them).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from test_engine_helpers import one_thread, ragged_batch, tiny_gpt2  # noqa: F401

from attribution.engine import step_values
from attribution.engine.exact import exact_second_order, exact_step_shapley
from attribution.engine.task import LanguageModelingTask


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@pytest.mark.slow
def test_sgd_step_values_against_exact_shapley():
    model = tiny_gpt2(eager=True)
    tr, tm = ragged_batch(8, 10, seed=11)
    va, vm = ragged_batch(3, 10, seed=12)
    rows = []
    for lr in (1e-2, 1e-1, 1.0):
        exact = exact_step_shapley(model, tr, tm, va, vm, lr)
        v1 = step_values(model, tr, va, lr, train_mask=tm, val_mask=vm)
        v2 = step_values(model, tr, va, lr, order=2, train_mask=tm, val_mask=vm)
        first, second = exact_second_order(model, tr, tm, va, vm, lr)
        # first order is exactly the Taylor first-order term; the trapezoid is second order up to O(lr^3)
        assert torch.allclose(v1, first, rtol=1e-9, atol=1e-15)
        rows.append(
            (
                lr,
                spearmanr(v1, exact)[0],
                spearmanr(v2, exact)[0],
                _rmse(v1, exact),
                _rmse(v2, exact),
                _rmse(second, exact),
                float((v2 - second).abs().max() / second.abs().max()),
            )
        )
    print("\nSGD, batch 8, exact Shapley over 256 subsets")
    print(
        "lr | spearman 1st | spearman 2nd | RMSE 1st | RMSE 2nd (trapezoid) | RMSE 2nd (HVP Taylor) | trapezoid vs HVP"
    )
    for r in rows:
        print(f"{r[0]:g} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.3e} | {r[4]:.3e} | {r[5]:.3e} | {r[6]:.2e}")
    small = rows[0]
    assert small[1] >= 0.95
    assert small[4] * 2 <= small[3]
    assert rows[1][4] * 2 <= rows[1][3]
    # trapezoid and exact second-order Taylor differ by O(lr^3): relative gap shrinks ~ lr^2... at least 10x per decade
    assert rows[0][6] < rows[1][6] / 10


@pytest.mark.slow
def test_adamw_step_values_against_exact_shapley():
    model = tiny_gpt2(seed=4)
    task = LanguageModelingTask()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(5):  # warm state: momentum and second moments from real steps
        ids, mask = ragged_batch(8, 10, seed=100 + step)
        opt.zero_grad()
        task.per_sequence_loss(model, ids, mask).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for lr in (1e-4, 1e-3):
        for draw in range(3):  # Spearman over 8 values is coarse: several batches per learning rate
            tr, tm = ragged_batch(8, 10, seed=21 + draw)
            va, vm = ragged_batch(3, 10, seed=31 + draw)
            exact = exact_step_shapley(model, tr, tm, va, vm, lr, optimizer=opt)
            aware = step_values(model, tr, va, lr, optimizer=opt, train_mask=tm, val_mask=vm)
            plain = step_values(
                model, tr, va, lr, optimizer=opt, train_mask=tm, val_mask=vm, second_moment=False
            )
            sgd = step_values(model, tr, va, lr, train_mask=tm, val_mask=vm)
            rows.append(
                (
                    lr,
                    draw,
                    spearmanr(aware, exact)[0],
                    spearmanr(plain, exact)[0],
                    spearmanr(sgd, exact)[0],
                    _rmse(aware, exact),
                    _rmse(plain, exact),
                )
            )
    print("\nAdamW (5 warm steps), batch 8, exact Shapley of the real AdamW step over 256 subsets")
    print(
        "lr | draw | spearman aware | spearman aware (v fixed) | spearman SGD proxy | RMSE aware | RMSE aware (v fixed)"
    )
    for r in rows:
        print(f"{r[0]:g} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.3e} | {r[6]:.3e}")
    for lr in (1e-4, 1e-3):
        sel = [r for r in rows if r[0] == lr]
        aware, sgd = (sum(r[k] for r in sel) / len(sel) for k in (2, 4))
        print(f"lr {lr:g}: mean spearman aware {aware:.3f}, SGD proxy {sgd:.3f}")
        assert aware >= 0.85 and aware >= sgd + 0.15
        assert sum(r[5] for r in sel) < sum(r[6] for r in sel)  # the v-share lowers the error
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
