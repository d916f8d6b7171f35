"""A FAISS index of the checkpoint similarity, so that `claim --fast` ranks the way the default view ranks.

Why: the default view (`standout_checkpoint`, `attribution.workflows.checkpoint_similarity`) reads the
mean over the kept links s of the cosine of `u_s(x) = K_s^(power/2) g_x(w_s)`. The in-run sketch
(`attribution.train.sketch`) projects another quantity, each step's weighted gradient, so its fast
answer disagrees with the default view by design (docs/benchmarks.md, "Session 9"). The checkpoint pass
that `attribution run` makes after training already holds every document's unit side at every link;
this module count-sketches it there, with no extra gradient:

    v(x) = concat over the L links s of  C_s(u_s(x) / |u_s(x)|) / sqrt(L)

`C_s` sends every parameter coordinate to one of the link's `D_s` buckets with a random sign
(`CountSketch`; `E[C^T C] = I`, the `D_s` split `dim - 1` evenly; the last column is reserved), so `<v(d), v(t)>` estimates
`checkpoint_cosine(d, t)` without bias, with an error of about `1/sqrt(dim)` whatever the number of
parameters. A claim's `v(t)` is the same recipe at the same links with the same hashes (drawn from the
seed in the meta). The standout z is linear in it once each document's vector is divided by the sd of
its exact reference cosines (from the same pass; for the pooled z of `views.POOLED_SCALE`, the one scale
of every document), widened by the estimate's own noise variance:
`z(d, t) = <[v_d, -mu_d], [v_t, 1]> / sqrt(sd_d^2 + 1/dim)`, with `-mu_d` and `1` in the reserved column.

The candidates are then confirmed exactly: their checkpoint cosines with every parameter at the
hash-verified kept checkpoints (`confirm`), seconds rather than a replay of training.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_write
from attribution.train.sketch import SketchIndex, describe_index, read_meta, write_index
from attribution.values.views import POOLED_SCALE, nearest_reference, pooled_scale, reference_moments

FOLDER = "checkpoint_sketch"
INDEX = "index.faiss"
STANDOUT_INDEX = "index_standout.faiss"
META = "meta.json"
VIEWS = ("checkpoint_cosine", "standout_checkpoint")
# the variance of an estimate `<v(d), v(t)>` of unit sides is about NOISE / dim (a count sketch of width w
# adds about 1/w per link; the mean over L links of dim/L buckets each: 1/dim); the standout index adds it
# to each document's reference variance
NOISE = 1.0
# parameter coordinates whose hashes are drawn from one generator: part of the recipe (a claim made later
# must draw the same hashes), so never change it for a run's index; a draw's coordinates are then added
# in slices of APPLY, which bounds the `[items, slice]` temporary (80 MiB for 20 float32 rows)
CHUNK = 1 << 22
APPLY = 1 << 20


class CountSketch:
    """`C: R^n -> R^width`: coordinate i is added to bucket `h(i)` with sign `s(i)`, both drawn from
    (seed, link) chunk by chunk, so a claim made later draws the same `C` from the meta's seed."""

    def __init__(self, n: int, width: int, seed: int, link: int, device, dtype):
        import torch

        self.width = int(width)
        self.parts = []
        for c, start in enumerate(range(0, n, CHUNK)):
            key = zlib.crc32(f"checkpoint-sketch:{seed}:{link}:{c}".encode())
            gen = torch.Generator().manual_seed(key)
            m = min(CHUNK, n - start)
            h = torch.randint(0, self.width, (m,), generator=gen)
            s = torch.randint(0, 2, (m,), generator=gen).to(dtype) * 2 - 1
            self.parts.append((start, h.to(device), s.to(device)))

    def __call__(self, x):
        """`[B, n] -> [B, width]`."""
        out = x.new_zeros(x.shape[0], self.width)
        for start, h, s in self.parts:
            for a in range(0, len(h), APPLY):
                b = min(a + APPLY, len(h))
                out.index_add_(1, h[a:b], x[:, start + a : start + b] * s[a:b])
        return out


def widths(dim: int, n_links: int) -> list[int]:
    """The buckets of each link: `dim` split as evenly as possible (earlier links take the remainder)."""
    if dim < n_links:
        raise UserError(f"--sketch-dim {dim} is smaller than the run's {n_links} kept checkpoints")
    return [len(part) for part in np.array_split(np.arange(dim), n_links)]


class Sketcher:
    """Collects `v(x)` of one kind of item ("doc" or "text") from `checkpoint_similarity.cosines`' sink."""

    def __init__(self, kind: str, dim: int, n_links: int, seed: int):
        self.kind, self.seed, self.n_links = kind, int(seed), int(n_links)
        if dim - 1 < n_links:
            raise UserError(f"--sketch-dim {dim} is too small for the run's {n_links} kept checkpoints")
        # the last column is reserved (zero): the standout index puts its constant there, so that both
        # indexes keep `dim` columns (FAISS's float16 search is ~13x slower at 513 than at 512 columns)
        self.widths = widths(dim - 1, n_links)
        self.offsets = np.cumsum([0] + self.widths)
        self.vectors = np.zeros((0, dim))  # grows to the items seen
        self._link: tuple[int, CountSketch] | None = None

    def __call__(self, kind: str, link: int, items: range, rows) -> None:
        if kind != self.kind:
            return
        if self._link is None or self._link[0] != link:  # one link's hashes held at a time
            self._link = None
            count = CountSketch(rows.shape[1], self.widths[link], self.seed, link, rows.device, rows.dtype)
            self._link = (link, count)
        part = self._link[1](rows).double().cpu().numpy() / np.sqrt(self.n_links)
        if items.stop > len(self.vectors):
            grown = np.zeros((items.stop, self.vectors.shape[1]))
            grown[: len(self.vectors)] = self.vectors
            self.vectors = grown
        self.vectors[items.start : items.stop, self.offsets[link] : self.offsets[link + 1]] = part


def for_documents(run: str | Path, dim: int, seed: int) -> Sketcher:
    """The sink that sketches the run's documents during its checkpoint pass."""
    from attribution.train import chain

    return Sketcher("doc", dim, len(chain.links(run)), seed)


def write(run: str | Path, sketch: Sketcher, frame: pd.DataFrame, *, power: float) -> Path:
    """`checkpoint_sketch/index.faiss` (`v_d`), `index_standout.faiss` (`[v_d, -mu_d] / sqrt(sd_d^2 + 1/dim)`, when the
    run has a reference set) and `meta.json`, written last: its presence means a whole index. `frame`:
    the checkpoint pass's rows (`checkpoint_similarity.for_run`), whose reference rows give mu and sd."""
    from attribution.train import chain
    from attribution.train.sketch import STORAGE
    from attribution.values.views import REFERENCE_SET

    folder = Path(run) / FOLDER
    # only documents with a gradient: one the run never trained has no sequence, no value and no row in
    # the exact views, so it has no vector here either (as in the in-run sketch)
    every = np.asarray(pd.unique(frame["doc_id"]), dtype=object)
    vectors = np.zeros((len(every), sketch.vectors.shape[1]))
    vectors[: len(sketch.vectors)] = sketch.vectors
    trained = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)
    doc_ids, vectors = [str(d) for d in every[trained]], vectors[trained]
    files, scales = {"raw": INDEX}, {"raw": write_index(folder / INDEX, vectors)}
    ref = frame[frame["val_set"].astype(str) == REFERENCE_SET]
    if len(ref):
        files["standout"] = STANDOUT_INDEX
        scales["standout"] = write_index(
            folder / STANDOUT_INDEX, standout_vectors(vectors, ref, doc_ids, power)
        )
    meta = {
        "dim": int(vectors.shape[1]),
        "widths": sketch.widths,
        "links": [lk.step for lk in chain.links(run)],
        "seed": sketch.seed,
        "power": power,
        "doc_ids": doc_ids,
        "files": files,
        "scale": scales,
        "storage": STORAGE,
        "similarity": "concat over kept links s of C_s(unit K_s^(power/2) g(w_s)) / sqrt(L); C_s a count "
        "sketch of every parameter; inner products estimate checkpoint_cosine",
        "standout": "[v_d, -mu_d] / sqrt(sd_d^2 + noise / dim) (mu, sd: the document's exact checkpoint "
        "cosines for the reference texts, sd pooled over the documents when `pooled`; 0 where its z is "
        "undefined), searched with [v_t, 1]",
        "noise": NOISE,
        "pooled": _pooled(),
    }
    with atomic_write(folder / META) as fh:
        json.dump(meta, fh)
    return folder


def standout_vectors(
    vectors: np.ndarray, ref: pd.DataFrame, doc_ids: Sequence[str], power: float
) -> np.ndarray:
    """`[v_d, -mu_d] / sqrt(sd_d^2 + NOISE/dim)` per document (zero where `views.standout` leaves z
    undefined: fewer than `MIN_REFERENCE` reference rows, or no spread), so that `<., [v_t, 1]>` is the
    standout z of the estimate, its spread widened by the estimate's own noise variance.

    Why widened: dividing by the exact `sd_d` alone ranks by noise the documents whose reference spread is
    below the sketch's resolution; on the demo's own rewrites (the tuning set) at dim 512 the plain z
    found the original among the top 10 for 2 of 8 texts, the widened z for 8 of 8 (docs/benchmarks.md,
    "Session 12"). `ref`: the document's exact checkpoint cosines for the reference texts (column at
    `power`)."""
    mu, sd = reference_stats(ref, doc_ids, power)
    ok = np.isfinite(sd)
    both = vectors.copy()
    both[:, -1] = np.nan_to_num(-mu)  # the reserved column
    spread = widened(np.where(ok, sd, 0.0), vectors.shape[1])
    return np.where(ok[:, None], both / spread[:, None], 0.0)


def reference_stats(ref: pd.DataFrame, doc_ids: Sequence[str], power: float) -> tuple[np.ndarray, np.ndarray]:
    """Each document's mean and sample sd of its exact checkpoint cosines for the reference texts (rows
    of `ref`, column at `power`), as `views.reference_moments` takes them: sd is NaN where the standout z
    is undefined (fewer than `MIN_REFERENCE` rows, or no spread), and pooled where the view pools it."""
    from attribution.workflows.checkpoint_similarity import power_column

    matrix = reference_matrix(ref, power_column(power), doc_ids).to_numpy(np.float64)
    return reference_moments(matrix, pooled=_pooled())


def _pooled() -> bool:
    """Whether the standout z of the checkpoint cosine divides by one pooled scale per text."""
    from attribution.values.results import CHECKPOINT_COLUMN

    return CHECKPOINT_COLUMN in POOLED_SCALE


def widened(sd: np.ndarray, dim: int) -> np.ndarray:
    """`sqrt(sd^2 + NOISE / (dim - 1))`: a document's reference spread widened by the variance of a sketch
    estimate at `dim` (one column of the index is reserved)."""
    return np.sqrt(sd**2 + NOISE / (dim - 1))


def reference_matrix(ref: pd.DataFrame, column: str, doc_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """`[documents, reference texts]` of `column` from reference rows `ref` (`doc_id`, `val_id`), ids as
    strings, rows in the order of `doc_ids` when given (NaN for a document without rows)."""
    wide = ref.astype({"doc_id": str, "val_id": str}).pivot(index="doc_id", columns="val_id", values=column)
    return wide if doc_ids is None else wide.reindex([str(d) for d in doc_ids])


def _standout_against(
    frame: pd.DataFrame, neighbours: Mapping[str, Sequence[str]] | None, every: pd.DataFrame
) -> np.ndarray:
    """The exact standout z of each claim row of `frame` (the confirming pass: claims and reference rows
    of the candidates) against its claim's `neighbours` (None: every reference text), 0 where undefined,
    as the view gives it. `every`: every document's exact reference cosines (the run's checkpoint pass),
    whose spread gives a pooled z its scale: the candidates alone would give another."""
    from attribution.values.results import CHECKPOINT_COLUMN
    from attribution.values.views import REFERENCE_SET

    docs = frame["doc_id"].astype(str)
    is_ref = (frame["val_set"] == REFERENCE_SET).to_numpy()
    wide = reference_matrix(frame[is_ref], CHECKPOINT_COLUMN)
    z = np.zeros(len(frame))
    for claim, rows in frame[~is_ref].groupby(frame.loc[~is_ref, "val_id"].astype(str)).groups.items():
        cols = list(wide.columns) if neighbours is None else list(neighbours[claim])
        mu, sd = reference_moments(wide.reindex(index=docs[rows], columns=cols).to_numpy(np.float64))
        if _pooled():
            scale = pooled_scale(reference_moments(every[cols].to_numpy(np.float64))[1])
            sd = np.where(np.isfinite(sd), scale, np.nan)
        z[frame.index.get_indexer(rows)] = np.nan_to_num((frame.loc[rows, CHECKPOINT_COLUMN] - mu) / sd)
    return z


def describe(run: str | Path) -> dict[str, Any] | None:
    """The manifest's description of the index, or None when the run has none."""
    keys = ("dim", "widths", "links", "seed", "power", "noise", "storage", "similarity", "standout")
    return describe_index(Path(run) / FOLDER, keys, ", ".join(VIEWS))


def exists(run: str | Path) -> bool:
    return (Path(run) / FOLDER / META).is_file()


def read(run: str | Path, config: Mapping[str, Any] | None = None) -> SketchIndex:
    """The run's checkpoint index; one clear line when there is none or it does not match the run."""
    from attribution.train import chain

    folder = Path(run) / FOLDER
    if not exists(run):
        raise UserError(
            f"{run}: this run has no checkpoint sketch index ({FOLDER}/{META}); it was trained with "
            "--no-sketch or --no-checkpoint-view, or before the index existed: use `attribution claim` "
            "without --fast (exact), or --fast --view standout_cosine (the in-run sketch)"
        )
    meta = read_meta(folder / META, config)
    steps = [lk.step for lk in chain.links(run)]
    if [int(s) for s in meta.get("links", [])] != steps:
        raise UserError(
            f"{folder / META}: the index was made at kept checkpoints {meta.get('links')}, but the run's "
            f"replay chain holds {steps}: the index is not this run's"
        )
    return SketchIndex(folder, meta)


# ---------------------------------------------------------------------------------------------
# Claims


def query_vectors(run: str | Path, index: SketchIndex, claims) -> np.ndarray:
    """`[n_claims, dim]`: `v(t)` of each claim text (`ValData`), at the index's links and hashes."""
    from attribution.workflows import checkpoint_similarity

    meta = index.meta
    texts = Sketcher("text", index.dim, len(meta["links"]), meta["seed"])
    checkpoint_similarity.for_run(
        run, {"claims": claims}, doc_ids=(), powers=(float(meta["power"]),), reference=False, sink=texts
    )
    out = np.zeros((len(claims.example_ids), index.dim))
    out[: len(texts.vectors)] = texts.vectors
    return out


def ranking_index(index: SketchIndex, view: str):
    """(FAISS index, scale, the query's reserved column) of a checkpoint view: `checkpoint_cosine` searches
    `[v_d, 0]` with queries `[v_t, 0]`; `standout_checkpoint` the widened `[v_d, -mu_d] / sd_d` with
    queries `[v_t, 1]`."""
    if view == "checkpoint_cosine":
        return index.load("raw"), index.scale("raw"), 0.0
    return index.load("standout"), index.scale("standout"), 1.0


def search(run: str | Path, index: SketchIndex, view: str, claims, k: int | None) -> Search:
    """The claims' top `k` documents under a checkpoint view (all documents when `k` is None).

    `standout_checkpoint` with more reference texts than `views.NEAREST_REFERENCE` allows compares each
    claim with its nearest reference texts, which depend on the claim: its z is then computed per claim
    from the estimated cosines of every document (`<v_d, v_t>`) and the documents' exact reference
    cosines, the neighbours chosen by the estimated column, instead of from the index's fixed `mu_d, sd_d`."""
    if view not in VIEWS:
        raise ValueError(f"{view!r} is not a checkpoint view ({', '.join(VIEWS)})")
    q = query_vectors(run, index, claims)
    doc_ids = np.asarray(index.meta["doc_ids"], dtype=object)
    near = _nearest_setup(run, index) if view == "standout_checkpoint" else None
    if near is not None:
        ref, ref_ids, n_near = near
        estimates = _estimates(index, q)
        neighbours = nearest_reference(estimates.T, ref, n_near)
        z = np.zeros_like(estimates)
        for j, cols in enumerate(neighbours):
            mu, sd = reference_moments(ref[:, cols], pooled=_pooled())
            z[j] = np.nan_to_num((estimates[j] - mu) / widened(sd, index.dim))  # as `standout_vectors`
        k = z.shape[1] if k is None else min(int(k), z.shape[1])
        rows = np.argsort(-z, axis=1, kind="stable")[:, :k]
        chosen = {
            c: [ref_ids[i] for i in cols] for c, cols in zip(claims.example_ids, neighbours, strict=True)
        }
        return Search(np.take_along_axis(z, rows, axis=1), doc_ids[rows], chosen, ref.shape[1])
    faiss_index, scale, constant = ranking_index(index, view)
    q[:, -1] = constant
    k = faiss_index.ntotal if k is None else min(int(k), faiss_index.ntotal)
    scores, rows = faiss_index.search(np.ascontiguousarray(q, dtype=np.float32), k)
    return Search(scores.astype(np.float64) * scale, doc_ids[rows])


ESTIMATE_ROWS = 1 << 16  # documents reconstructed from the index at a time


def _estimates(index: SketchIndex, q: np.ndarray) -> np.ndarray:
    """`[claims, documents]`: `<v_d, v_t>` for every document, the index read back in blocks of
    `ESTIMATE_ROWS` vectors so that a large corpus is never held whole in float64 (the reserved column is
    0 in the raw index, so the query's does not count)."""
    out = np.empty((len(q), len(index.meta["doc_ids"])))
    for start, block in index.vector_blocks("raw", ESTIMATE_ROWS):
        out[:, start : start + len(block)] = q @ block.T
    return out


@dataclass(frozen=True)
class Search:
    """A checkpoint view's ranking: `scores` and `doc_ids`, `[claims, k]`; `neighbours`: per claim id,
    the reference texts its standout z was measured against, when not all of them."""

    scores: np.ndarray
    doc_ids: np.ndarray
    neighbours: dict[str, list[str]] | None = None
    reference_texts: int = 0  # with `neighbours`: how many reference texts the run has


def reference_cosines(run: str | Path, doc_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """`[documents, reference texts]`: every document's exact checkpoint cosines for the run's reference
    texts, from its checkpoint pass (rows in the order of `doc_ids` when given)."""
    from attribution.values.results import CHECKPOINT_COLUMN
    from attribution.values.rundir import CHECKPOINT_VALUES, RunDir
    from attribution.values.views import REFERENCE_SET

    cols = ["doc_id", "val_set", "val_id", CHECKPOINT_COLUMN]
    table = RunDir(run).table(CHECKPOINT_VALUES, cols, required=True, needs=cols)
    return reference_matrix(table[table["val_set"].astype(str) == REFERENCE_SET], CHECKPOINT_COLUMN, doc_ids)


def _nearest_setup(run: str | Path, index: SketchIndex) -> tuple[np.ndarray, list[str], int] | None:
    """(the documents' exact reference cosines `[documents, reference texts]` in the index's order, the
    reference ids, how many are nearest) when the standout z compares a claim with fewer than all of the
    run's reference texts, or when the index's fixed statistics are not the view's (an index written
    before the pooled z: it is then computed per claim against all of them); None when the index's fixed
    statistics serve."""
    from attribution.values.results import CHECKPOINT_COLUMN
    from attribution.values.views import NEAREST_REFERENCE

    n_near = NEAREST_REFERENCE.get(CHECKPOINT_COLUMN)
    stale = bool(index.meta.get("pooled", False)) != _pooled()
    if n_near is None and not stale:
        return None
    wide = reference_cosines(run, index.meta["doc_ids"])
    n_ref = wide.shape[1]
    if n_near is not None and n_ref <= n_near and not stale:
        return None
    return wide.to_numpy(np.float64), [str(c) for c in wide.columns], min(n_near or n_ref, n_ref)


def confirm(
    run: str | Path,
    index: SketchIndex,
    claims,
    doc_ids: Sequence[str],
    view: str,
    *,
    neighbours: Mapping[str, Sequence[str]] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """`claim_id, doc_id, exact, exact_cosine`: the candidates' exact checkpoint cosines (every parameter,
    no projection, at the index's power) and their value under `view`; the standout z is against the
    reference set's exact cosines for the same documents, computed in the same pass: against each claim's
    `neighbours` (`Search.neighbours`) where the search chose them, else against every reference text."""
    from attribution.values.results import CHECKPOINT_COLUMN
    from attribution.values.views import REFERENCE_SET
    from attribution.values.views import VIEWS as ALL_VIEWS
    from attribution.workflows import checkpoint_similarity

    power = float(index.meta["power"])
    frame = checkpoint_similarity.for_run(
        run, {"claims": claims}, doc_ids=doc_ids, powers=(power,), progress=progress
    )
    frame = frame.rename(columns={checkpoint_similarity.power_column(power): CHECKPOINT_COLUMN})
    if view == "standout_checkpoint":
        # never the view's own choice of neighbours: over the candidates alone it would differ from the
        # choice over every document; without the search's, every reference text
        frame["exact"] = _standout_against(frame, neighbours, reference_cosines(run, index.meta["doc_ids"]))
    else:
        frame["exact"] = ALL_VIEWS[view].fn(frame, pd.DataFrame())
    out = frame[frame["val_set"] != REFERENCE_SET]
    return out.rename(columns={"val_id": "claim_id", CHECKPOINT_COLUMN: "exact_cosine"})[
        ["claim_id", "doc_id", "exact", "exact_cosine"]
    ]
