"""Build validation documents from chosen training documents, with measured distances to the original.

The five kinds, from nearest to farthest from the original:

- `exact`: a verbatim copy.
- `partial`: a contiguous excerpt of at least half the original, framed as the answer to a new
  instruction (the paper's form).
- `paraphrase`: a meaning-preserving rewrite, sentence by sentence (rewriter).
- `significant`: a heavy rewrite: condensed, reordered, reworded (rewriter).
- `similar`: a different real document on a related subject, found by MiniLM search in a pool of
  documents held out of training.

Every record says how far it really is from its original: word 8-gram containment of the variant
in the original, word 3-gram Jaccard, and MiniLM cosine (documents are embedded as the mean of
~180-word chunks, since MiniLM reads only its first 256 word pieces).
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.corpus.document import Document
from attribution.errors import UserError
from attribution.io import atomic_write
from attribution.text import containment, jaccard, words
from attribution.variants.rewriters import OfflineRewriter, RewriteError, Rewriter

KINDS = ("exact", "partial", "paraphrase", "significant", "similar")
CHUNK_WORDS = 180  # ~250 word pieces: MiniLM's window
MAX_CHUNKS = 5  # distances cover the first ~900 words; picked originals are shorter than that
WEAK_SIMILAR = 0.3  # below this MiniLM cosine a "similar" document is not on a related subject
SIMILAR_MAX_CONTAINMENT = 0.2  # a pool document sharing more 8-grams than this is a copy, not a similar text

# Framing for partial copies: an instruction whose answer is the excerpt (the paper's construction).
_FRAMES = (
    "### Instruction:\nWrite a short passage about {topic}.\n\n### Response:\n{excerpt}",
    "Question: Could you write something on {topic}?\n\nAnswer: Here is a passage on that subject.\n\n{excerpt}",
    "User: I need a paragraph about {topic} for my notes.\nAssistant: Sure. {excerpt}\n\nLet me know if you want more.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STOP = frozenset(
    "the a an and or of to in on for with by at from as is are was were be been that this it its "
    "which who he she they we you i not but have has had will would can could may also into than "
    "their there these those such other more most said says".split()
)


def load_docs(corpus: Sequence[str]) -> list[Document]:
    """Every document of the corpus specs (paths, `builtin[:N]`, `hf:NAME`), in reading order."""
    from attribution.corpus import read_corpus, resolve_corpus

    paths = [p for spec in corpus for p in resolve_corpus(spec)]
    return list(read_corpus(paths))


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Validation records as JSONL (`{"id", "text", "meta"}` a line, UTF-8 kept as is), atomically."""
    with atomic_write(path) as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def parse_kinds(spec: str | Sequence[str]) -> list[str]:
    """`exact,partial,...` -> a list of known kinds (order kept, duplicates removed)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    kinds = list(dict.fromkeys(k.strip() for k in items if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(
            f"unknown variant kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}"
        )
    return kinds


def prose_score(text: str) -> float:
    """Share of word tokens that are common lower-case English words: near 1 for prose, low for
    code, tables and math. The paraphraser is for prose, so targets are picked by it."""
    from attribution.variants.thesaurus import common_words

    toks = re.findall(r"[A-Za-z]+|[^A-Za-z\s]+", text)
    if not toks:
        return 0.0
    common = common_words()
    share = sum(t.lower() in common for t in toks if t[0].isalpha()) / len(toks)
    symbols = len(re.findall(r"[(){}\[\]=_<>#*|\\/+^$@%&~`]", text)) / max(len(text), 1)
    digits = sum(c.isdigit() for c in text) / max(len(text), 1)
    # code and markup (symbols in more than ~5% of characters) and arithmetic (digits) are not prose
    return share * max(0.0, 1.0 - 20.0 * symbols) * max(0.0, 1.0 - 5.0 * digits)


def pick_targets(
    docs: Sequence[Document],
    n: int,
    seed: int = 0,
    *,
    min_words: int = 80,
    max_words: int = 800,
    min_prose: float = 0.6,
) -> list[Document]:
    """`n` prose documents of moderate length, drawn evenly across sources, deterministic for `seed`."""
    if n < 1:
        raise UserError(f"--pick must be at least 1, got {n}")
    by_source: dict[str, list[Document]] = {}
    for d in docs:
        if min_words <= len(words(d.text)) <= max_words and prose_score(d.text) >= min_prose:
            by_source.setdefault(d.source, []).append(d)
    if sum(map(len, by_source.values())) < n:
        raise UserError(
            f"only {sum(map(len, by_source.values()))} documents are prose of {min_words}-{max_words} words; "
            f"cannot pick {n} (use --ids or a larger corpus)"
        )
    rng = random.Random(seed)
    pools = {s: sorted(v, key=lambda d: d.doc_id) for s, v in sorted(by_source.items())}
    for v in pools.values():
        rng.shuffle(v)
    picked: list[Document] = []
    while len(picked) < n:
        for s in list(pools):
            if pools[s] and len(picked) < n:
                picked.append(pools[s].pop())
    return picked


def select_ids(docs: Sequence[Document], ids: Sequence[str]) -> list[Document]:
    index = {d.doc_id: d for d in docs}
    missing = [i for i in ids if i not in index]
    if missing:
        raise UserError(
            f"--ids not in the corpus: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return [index[i] for i in ids]


def split_pool(
    docs: Sequence[Document], targets: Sequence[Document], fraction: float, seed: int
) -> list[Document]:
    """A seeded share of the non-target documents, to be held out of training as the similar-topic pool."""
    if not 0 < fraction < 1:
        raise UserError(f"--pool-fraction must be between 0 and 1, got {fraction}")
    taken = {d.doc_id for d in targets}
    rest = sorted((d for d in docs if d.doc_id not in taken), key=lambda d: d.doc_id)
    rng = random.Random(f"pool:{seed}")
    return rng.sample(rest, max(1, round(fraction * len(rest)))) if rest else []


def doc_vectors(texts: Sequence[str], progress: bool = False) -> np.ndarray:
    """Whole-document MiniLM vectors: the normalized mean of the embeddings of up to MAX_CHUNKS chunks."""
    from attribution.embeddings import embed

    chunks: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        toks = text.split()
        for j in range(0, min(max(len(toks), 1), CHUNK_WORDS * MAX_CHUNKS), CHUNK_WORDS):
            chunks.append(" ".join(toks[j : j + CHUNK_WORDS]))
            owner.append(i)
    vecs = embed(chunks, show_progress=progress)
    out = np.zeros((len(texts), vecs.shape[1] if len(vecs) else 384), dtype=np.float64)
    np.add.at(out, np.asarray(owner, dtype=np.int64), vecs.astype(np.float64))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def topic_words(text: str, k: int = 3) -> list[str]:
    """The document's most frequent content words: a topic to ask for in a partial copy's instruction."""
    counts = Counter(w for w in words(text) if len(w) > 3 and w.isalpha() and w not in _STOP)
    return [w for w, _ in counts.most_common(k)] or ["this subject"]


def partial_copy(doc: Document, rng: random.Random) -> tuple[str, dict]:
    """A contiguous excerpt of 50-80% of the original's words, cut at sentence ends where possible,
    set as the answer to a new instruction."""
    text = doc.text.strip()
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    bounds = sorted(set(bounds))
    total = len(words(text))
    need = rng.uniform(0.5, 0.8) * total
    # words before each boundary; a slice [s, e) between boundaries holds cum[e] - cum[s] words
    cum = [len(words(text[:b])) for b in bounds]
    feasible = []
    for i in range(len(bounds) - 1):
        j = next((j for j in range(i + 1, len(bounds)) if cum[j] - cum[i] >= need), None)
        if j is not None:
            feasible.append((bounds[i], bounds[j]))
    s, e = feasible[rng.randrange(len(feasible))] if feasible else (0, len(text))
    excerpt = text[s:e].strip()
    topic = topic_words(text)
    topic_text = topic[0] if len(topic) == 1 else ", ".join(topic[:-1]) + " and " + topic[-1]
    frame = _FRAMES[rng.randrange(len(_FRAMES))]
    return frame.format(topic=topic_text, excerpt=excerpt), {
        "excerpt_share": round(len(words(excerpt)) / max(total, 1), 3),
    }


@dataclass
class SimilarFinder:
    """Nearest pool document by MiniLM, excluding near-copies of the target."""

    pool: Sequence[Document]
    vectors: np.ndarray
    max_words: int | None = None  # longest pool document that may serve (validation cost grows with length)

    @classmethod
    def build(cls, pool: Sequence[Document], max_words: int | None = None) -> SimilarFinder:
        if not pool:
            raise UserError("the similar-topic pool is empty: give a larger corpus or --pool-fraction")
        from attribution.embeddings import embed

        # one vector per pool document (its opening), as a semantic search engine would index it
        if max_words is not None:
            pool = [d for d in pool if len(words(d.text)) <= max_words]
            if not pool:
                raise UserError(f"no pool document has at most {max_words} words to serve as 'similar'")
        return cls(pool, embed([d.text for d in pool], show_progress=len(pool) > 200), max_words)

    def find(self, doc: Document, doc_vec: np.ndarray, used: set[str]) -> tuple[Document, float]:
        sims = self.vectors @ doc_vec
        order = np.argsort(-sims, kind="stable")
        for allow_reuse in (False, True):  # prefer a document no other original got; share one if need be
            for i in order:
                cand = self.pool[int(i)]
                if cand.doc_id == doc.doc_id or (cand.doc_id in used and not allow_reuse):
                    continue
                if (
                    containment(cand.text, doc.text) > SIMILAR_MAX_CONTAINMENT
                    or cand.text.strip() == doc.text.strip()
                ):
                    continue
                return cand, float(sims[i])
        raise UserError(
            f"no document in the pool is different enough from {doc.doc_id} to serve as 'similar'"
        )


def measure(variant: str, original: str, cos: float) -> dict[str, float]:
    """The three distances every record carries."""
    return {
        "containment_8": round(containment(variant, original, 8), 4),
        "jaccard_3": round(jaccard(variant, original, 3), 4),
        "cosine_minilm": round(float(cos), 4),
    }


def build_variants(
    targets: Sequence[Document],
    kinds: Sequence[str],
    *,
    rewriter: Rewriter | None = None,
    pool: Sequence[Document] = (),
    seed: int = 0,
    similar_max_words: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Validation records `{"id", "text", "meta": {"variant", "target_id", ...distances}}` for each
    target and kind. Never returns a record with empty text."""
    rewriter = rewriter or OfflineRewriter()
    finder = SimilarFinder.build(pool, similar_max_words) if "similar" in kinds else None
    if finder:
        from attribution.embeddings import embed

        target_vecs = embed([d.text for d in targets])
    else:
        target_vecs = None
    used: set[str] = set()
    records: list[dict] = []
    for t_i, doc in enumerate(targets):
        rng = random.Random(f"{seed}:{doc.doc_id}")
        for kind in kinds:
            meta: dict = {"variant": kind, "target_id": doc.doc_id, "target_source": doc.source}
            if kind == "exact":
                text = doc.text
            elif kind == "partial":
                text, extra = partial_copy(doc, rng)
                meta.update(extra)
            elif kind in ("paraphrase", "significant"):
                out = rewriter.rewrite(doc.text, kind, seed)
                text = out.text
                meta["rewriter"] = out.rewriter
                if out.fallback_reason:
                    meta["fallback_reason"] = out.fallback_reason
            else:
                assert finder is not None and target_vecs is not None
                similar, sim = finder.find(doc, target_vecs[t_i], used)
                used.add(similar.doc_id)
                text = similar.text
                meta.update(
                    {
                        "similar_doc_id": similar.doc_id,
                        "similar_source": similar.source,
                        "similar_owner": similar.owner,
                    }
                )
            if not text.strip():
                raise RewriteError(f"the {kind} variant of {doc.doc_id} came out empty")
            records.append({"id": f"{kind}:{doc.doc_id}", "text": text, "meta": meta})
        if progress:
            progress(1)
    add_distances(records, targets)
    for r in records:
        if r["meta"]["variant"] == "similar" and r["meta"]["cosine_minilm"] < WEAK_SIMILAR:
            print(
                f"warning: the pool's closest document to {r['meta']['target_id']} ({r['meta']['similar_doc_id']}) "
                f"has MiniLM cosine {r['meta']['cosine_minilm']:.2f}: not on a related subject; use a larger "
                "corpus or --pool-fraction",
                file=sys.stderr,
            )
    return records


def add_distances(records: Sequence[dict], targets: Sequence[Document]) -> None:
    """Put `measure`'s three distances to its original (`meta.target_id`, one of `targets`) into each
    record's meta, in place: generated and hand-written variants are described alike."""
    vecs = doc_vectors([r["text"] for r in records] + [d.text for d in targets])
    by_target = {d.doc_id: (d, vecs[len(records) + i]) for i, d in enumerate(targets)}
    for r, v in zip(records, vecs[: len(records)], strict=True):
        original, ov = by_target[r["meta"]["target_id"]]
        r["meta"].update(measure(r["text"], original.text, float(v @ ov)))


def distance_summary(records: Sequence[dict]) -> list[dict]:
    """Per kind: count and the median / 10th / 90th percentile of each distance."""
    rows = []
    for kind in dict.fromkeys(r["meta"]["variant"] for r in records):
        sel = [r["meta"] for r in records if r["meta"]["variant"] == kind]
        row: dict = {"variant": kind, "n": len(sel)}
        for key in ("containment_8", "jaccard_3", "cosine_minilm"):
            vals = np.array([m[key] for m in sel], dtype=np.float64)
            row[f"{key}_median"] = round(float(np.median(vals)), 4)
            row[f"{key}_p10"] = round(float(np.percentile(vals, 10)), 4)
            row[f"{key}_p90"] = round(float(np.percentile(vals, 90)), 4)
        rows.append(row)
    return rows
