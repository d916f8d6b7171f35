"""A small synthetic run directory with the schema `attribution run` writes (docs/architecture.md).

Real-looking text from several sources and owners, a few hostile documents (script tags, event
handlers, javascript: links, remote images), and random but internally consistent values:
document values are the sums of the per-step values, per-set values are sums of per-example values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from train_fixtures import lee_articles, train_micro

from attribution.values.manifest import CorpusInfo, Manifest, Timings, TrainingInfo, ValSetInfo, ValuesInfo
from attribution.values.views import DEFAULT_VIEW

SENTENCES = {
    "news": [
        "The central bank left interest rates unchanged on Thursday, citing slowing inflation.",
        "Officials said the bridge would reopen to traffic after three weeks of repairs.",
        "Voters in the northern district turned out in record numbers despite heavy rain.",
        "The company reported quarterly revenue above analysts' expectations.",
        "Firefighters contained the blaze before it reached the residential area.",
        "The minister promised new funding for rural hospitals over the next five years.",
    ],
    "code": [
        "def parse_header(line):\n    key, _, value = line.partition(':')\n    return key.strip(), value.strip()",
        "for index, item in enumerate(items):\n    if item is None:\n        continue",
        "class Cache:\n    def __init__(self, size=128):\n        self._data = {}\n        self.size = size",
        "with open(path, encoding='utf-8') as fh:\n    lines = [line.rstrip() for line in fh]",
        "raise ValueError(f'unexpected token {token!r} at position {pos}')",
    ],
    "legal": [
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
        "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
        "Redistributions of source code must retain the above copyright notice and this list of conditions.",
        "In no event shall the authors or copyright holders be liable for any claim, damages or other liability.",
    ],
    "books": [
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
        "All the world's a stage, and all the men and women merely players.",
        "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    ],
}

OWNERS = {
    "news": ["Daily Ledger Ltd", "Metro Press"],
    "code": ["Python Software Foundation"],
    "legal": ["Open Source Initiative", "Free Software Foundation"],
    "books": ["Public Domain"],
}

HOSTILE = [
    "Breaking: <script>window.__pwned=1</script> markets rally as investors cheer.",
    'Photo caption <img src=x onerror="window.__pwned=1"> shows the harbour at dawn.',
    'Read more [here](javascript:window.__pwned=1) or <a href="javascript:window.__pwned=1">there</a>.',
    'Tracking pixel <img src="http://evil.example/pixel.png"> and <iframe src="https://evil.example/"></iframe>'
    ' <link rel="stylesheet" href="http://evil.example/x.css"> | pipes | `ticks` *stars* $x^2$',
]


def make_run(
    out: Path,
    *,
    seed: int = 0,
    n_docs: int = 48,
    n_steps: int = 24,
    batch: int = 8,
    val_sizes: dict[str, int] | None = None,
    hostile: bool = True,
    owner_override: dict[str, str] | None = None,
) -> Path:
    """Write a run directory at `out` and return it. `seed` changes only the values, not the corpus."""
    val_sizes = val_sizes or {"news": 3, "code": 2}
    corpus_rng = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "val_sets").mkdir(parents=True, exist_ok=True)

    sources = list(SENTENCES)
    rows = []
    for i in range(n_docs):
        src = sources[i % len(sources)]
        k = int(corpus_rng.integers(2, 5))
        picks = corpus_rng.choice(len(SENTENCES[src]), size=k, replace=True)
        text = ("\n" if src == "code" else " ").join(SENTENCES[src][j] for j in picks)
        owners = OWNERS[src]
        rows.append(
            {
                "doc_id": f"{src}-{i:04d}",
                "source": src,
                "owner": owners[i % len(owners)],
                "license": "CC-BY-4.0" if src != "code" else "PSF-2.0",
                "text": text,
            }
        )
    if hostile:
        for j, text in enumerate(HOSTILE):
            rows.append(
                {
                    "doc_id": f"web-hostile-{j}",
                    "source": "web<script>window.__pwned=1</script>",
                    "owner": '<img src=x onerror="window.__pwned=1">',
                    "license": None,
                    "text": text,
                }
            )
    docs = pd.DataFrame(rows)
    if owner_override:
        docs["owner"] = [owner_override.get(d, o) for d, o in zip(docs.doc_id, docs.owner, strict=True)]
    docs["n_tokens"] = [max(1, len(t.split()) * 4 // 3) for t in docs.text]
    docs["n_seqs"] = 1
    docs = docs[["doc_id", "source", "owner", "license", "n_tokens", "n_seqs", "text"]]
    docs.to_parquet(out / "docs.parquet", index=False)

    # Validation sets; the first news example is a partial copy of a training document.
    val = {}
    for name, size in val_sizes.items():
        src = name if name in SENTENCES else "news"
        items = []
        for k in range(size):
            if k == 0:
                target = docs[docs.source == src].iloc[0]
                text = "Answer the question in full. " + target.text
                meta = {"variant": "partial_copy", "target_id": target.doc_id}
            else:
                text = " ".join(corpus_rng.choice(SENTENCES[src], size=2))
                meta = {"variant": "similar_topic"}
            items.append({"id": f"{name}-{k}", "text": text, "meta": meta})
        val[name] = items
        with open(out / "val_sets" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for it in items:
                fh.write(json.dumps(it) + "\n")

    # Per-step, per-example values: each doc has a mean effect, plus noise; values shrink over time.
    n = len(docs)
    doc_mean = rng.normal(0.2, 1.0, size=n) * 1e-3
    target_rows = {it["meta"].get("target_id") for items in val.values() for it in items}
    boost = docs.doc_id.isin(target_rows).to_numpy()
    step_rows, ex_acc = [], {}
    for step in range(n_steps):
        batch_idx = rng.choice(n, size=min(batch, n), replace=False)
        if step == 0:  # make sure every partial-copy target is trained on at least once
            batch_idx = np.unique(np.concatenate([np.flatnonzero(boost), batch_idx]))
        scale = 1.0 / (1.0 + 0.2 * step)
        for name, items in val.items():
            per_ex = (
                doc_mean[batch_idx, None] + rng.normal(0, 1e-3, size=(len(batch_idx), len(items)))
            ) * scale
            for r, d in enumerate(batch_idx):
                if boost[d]:
                    per_ex[r, 0] += 5e-3 * scale
                step_rows.append((step, docs.doc_id[d], name, float(per_ex[r].sum())))
                for e, it in enumerate(items):
                    ex_acc[(docs.doc_id[d], name, it["id"])] = (
                        ex_acc.get((docs.doc_id[d], name, it["id"]), 0.0) + per_ex[r, e]
                    )
    step_values = pd.DataFrame(step_rows, columns=["step", "doc_id", "val_set", "value"])
    step_values.to_parquet(out / "step_values.parquet", index=False)

    ex = pd.DataFrame(
        [(d, s, v, x) for (d, s, v), x in ex_acc.items()], columns=["doc_id", "val_set", "val_id", "value"]
    )
    ex.to_parquet(out / "example_values.parquet", index=False)

    g = step_values.groupby(["doc_id", "val_set"])
    dv = g["value"].sum().rename("value").to_frame()
    dv["n_seen"] = g["step"].nunique()
    dv["first_step"] = g["step"].min()
    dv["last_step"] = g["step"].max()
    dv = dv.reset_index().merge(docs[["doc_id", "source", "owner"]], on="doc_id")
    dv["value_normalized"] = dv["value"] / dv["value"].abs().sum()
    dv = dv[
        [
            "doc_id",
            "source",
            "owner",
            "val_set",
            "value",
            "value_normalized",
            "n_seen",
            "first_step",
            "last_step",
        ]
    ]
    dv.to_parquet(out / "doc_values.parquet", index=False)

    window = 6
    sv = step_values.merge(docs[["doc_id", "source"]], on="doc_id")
    sv["window_start"] = sv.step // window * window
    sv["window_end"] = sv.window_start + window - 1
    st = sv.groupby(["window_start", "window_end", "source", "val_set"], as_index=False)["value"].sum()
    st["value_normalized"] = st["value"] / st.groupby(["window_start", "val_set"])["value"].transform(
        lambda x: x.abs().sum()
    )
    st.to_parquet(out / "stage_values.parquet", index=False)

    lr = [6e-4 * (1 - s / n_steps) for s in range(n_steps)]
    log = pd.DataFrame({"step": range(n_steps), "lr": lr, "train_loss": np.linspace(9.0, 6.0, n_steps)})
    for name in val:
        log[f"val_loss[{name}]"] = np.linspace(9.5, 7.0, n_steps)
    log["tokens_per_s"] = 1000.0
    log.to_csv(out / "train_log.csv", index=False)

    manifest = Manifest(
        seed=seed,
        config={
            "preset": "tiny",
            "steps": n_steps,
            "order": 1,
            "optimizer": "adamw",
            "optimizer_aware": False,
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 2,
            "seq_len": 64,
        },
        corpus=CorpusInfo(specs=["synthetic-fixture"], fingerprint="f1x7ure0123456789", n_docs_total=n),
        val_sets={k: ValSetInfo(n_docs=len(v), per_example=True) for k, v in val.items()},
        training=TrainingInfo(total_steps=n_steps, order=1, optimizer="adamw", values="sgd-proxy"),
        values=ValuesInfo(default_view=DEFAULT_VIEW),
        timings=Timings(train_seconds=12.5),
        git_commit="0000000",
        extra={"name": out.name},
    )
    manifest.write(out)
    return out


def make_real_run(root: Path, steps: int = 6) -> Path:
    """A real `attribution run` (train_and_value, `test-micro` GPT-2) on real news plus hostile documents.

    Two publishers own the news; a third source holds documents with script tags and event handlers.
    The validation set has a partial copy of one article and two unseen articles.
    """
    news = lee_articles()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(news[:16]):
            owner = ("Daily Ledger Ltd", "Metro Press")[i % 2]
            fh.write(
                json.dumps(
                    {"id": f"news-{i}", "text": text, "meta": {"pile_set_name": "news", "owner": owner}}
                )
                + "\n"
            )
        for i, text in enumerate(HOSTILE):
            fh.write(
                json.dumps(
                    {
                        "id": f"web-{i}",
                        "text": text + " " + news[40 + i],
                        "meta": {
                            "pile_set_name": "web<script>window.__pwned=1</script>",
                            "owner": '<img src=x onerror="window.__pwned=1">',
                        },
                    }
                )
                + "\n"
            )
    val = [
        {
            "id": "copy-3",
            "text": "Quote the report. " + " ".join(news[3].split()[:50]),
            "meta": {"variant": "partial_copy", "target_id": "news-3"},
        },
        {"id": "unseen-a", "text": news[100], "meta": {"variant": "unrelated"}},
        {"id": "unseen-b", "text": news[101], "meta": {"variant": "unrelated"}},
    ]
    return train_micro(root, val, steps)
