"""Report figures as PNG bytes (matplotlib's Agg renderer, no metadata so the bytes are reproducible).

Figures are built with `matplotlib.figure.Figure` and rendered by Agg directly, never through
pyplot, so importing this module does not change the global backend of a notebook or GUI session.

Text from the corpus (source names, snippets) is untrusted; in a PNG it cannot run, but `$` would
switch matplotlib into math mode and can make rendering fail, so labels go through `_label`.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LINES = 8


def _label(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _axes(figsize: tuple[float, float]):
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def stage_shares(stage: pd.DataFrame, by_share: list[str]) -> bytes:
    """Each source's share of the positive value per training window (the stage dependence).

    Within each window, source totals are clipped at zero and normalized, so the lines show which
    sources helped at that stage of training; `by_share` orders the legend (largest royalty first).
    """
    tot = stage.groupby(["window_start", "window_end", "source"], as_index=False)["value"].sum()
    tot["pos"] = tot.value.clip(lower=0)
    present = set(tot.source.tolist())
    keep = [s for s in by_share if s in present][:MAX_LINES]
    tot["series"] = np.where(tot.source.isin(keep), tot.source, "other sources")
    piv = tot.pivot_table(
        index=["window_start", "window_end"], columns="series", values="pos", aggfunc="sum", fill_value=0.0
    )
    denom = piv.sum(axis=1).replace(0, np.nan)
    shares = piv.div(denom, axis=0).fillna(0.0)
    x = [(a + b) / 2 for a, b in shares.index]
    fig, ax = _axes((8, 4))
    for name in keep + (["other sources"] if "other sources" in shares else []):
        if name in shares:
            ax.plot(x, shares[name].to_numpy(), marker="o", ms=3, label=_label(name, 30))
    ax.set_xlabel("training step (window midpoint)")
    ax.set_ylabel("share of positive value in window")
    ax.set_ylim(0, 1)
    ax.set_title("Source shares over training")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return _png(fig)


def value_distribution(values: np.ndarray) -> bytes:
    """Histogram of document values; negative bins red, with the negative fraction written on it."""
    values = np.asarray(values, dtype=np.float64)
    fig, ax = _axes((8, 3.6))
    if values.size and np.ptp(values) > 0:
        lo, hi = np.percentile(values, [0.5, 99.5])
        if lo == hi:
            lo, hi = values.min(), values.max()
        edges = np.linspace(lo, hi, 61)
        counts, edges = np.histogram(np.clip(values, lo, hi), bins=edges)
        centers = (edges[:-1] + edges[1:]) / 2
        colors = np.where(centers < 0, "#c0392b", "#2c7fb8")
        ax.bar(centers, counts, width=np.diff(edges), color=colors, edgecolor="none")
    ax.axvline(0, color="black", lw=1)
    neg = float((values < 0).mean()) if values.size else 0.0
    ax.text(
        0.01, 0.95, f"negative: {neg:.1%} of documents", transform=ax.transAxes, va="top", color="#c0392b"
    )
    ax.set_xlabel("document value (sum over chosen validation sets; outer 1% clipped to the edges)")
    ax.set_ylabel("documents")
    ax.set_title("Distribution of document values")
    return _png(fig)


def top_documents(rows: list[tuple[str, str, float, str]]) -> bytes:
    """Horizontal bars of the top documents per group: (group, doc_id, value, snippet)."""
    fig, ax = _axes((9, 0.32 * max(len(rows), 3) + 1))
    labels = [_label(f"{g} | {d}: {s}", 80) for g, d, _, s in rows]
    vals = [v for _, _, v, _ in rows]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, vals, color=["#2c7fb8" if v >= 0 else "#c0392b" for v in vals])
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("document value")
    ax.set_title("Top documents per group")
    return _png(fig)
