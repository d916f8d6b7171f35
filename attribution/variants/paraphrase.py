"""The offline rewriter: paraphrases built from a real thesaurus and light syntax, without any model.

Why it works for the experiment: a word 8-gram of the original survives only if eight words in a
row are left alone, so changing roughly one word in every five or six removes nearly all shared
8-grams, while swapping a word for its most common synonym barely moves a sentence embedding.
Two strengths exist:

- `paraphrase`: sentence by sentence; thesaurus synonyms (first WordNet senses of the word's likely
  part of speech), changed function words and contractions, and a leading subordinate clause moved
  to the end (or a trailing "because" clause to the front).
- `significant`: keeps only the most central sentences (condenses, drops), reorders them gist first,
  removes parentheticals and fillers, and substitutes every word it can.

Proper nouns, numbers, acronyms and code-like tokens are never changed. Output is deterministic for
a given text and seed.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from attribution.variants.thesaurus import Thesaurus, common_words

# Closed-class words (determiners, pronouns, auxiliaries, prepositions, conjunctions): a thesaurus has
# no useful synonyms for them, and swapping them breaks grammar. Not a synonym list.
_CLOSED = frozenset(
    """a an the this that these those my your his her its our their me him us them it he she we
    they you i who whom whose which what where when why how all any both each every few more most
    other some such no nor not only own same so than too very can will just should would could may
    might must shall be is are was were been being am have has had having do does did doing and but
    or if because as until while of at by for with about against between into through during before
    after above below to from up down in out on off over under again further then once here there
    also one two three first new many much well way even back still yet ever never however thus
    therefore although though since unless whether upon within without among across per via get got
    let lets like make made said says say use used using see given""".split()
)
_DETERMINERS = frozenset(
    "the a an this that these those his her its their our my your each every some any no".split()
)
_VERB_CUES = frozenset("to will would can could should may might must not do does did shall".split())

# Function-word and phrase alternations: syntax, not synonyms. Each entry is (pattern, replacement).
_FUNCTION_RULES: tuple[tuple[str, str], ...] = (
    (r"\bin order to\b", "to"),
    (r"\bdue to\b", "because of"),
    (r"\bin addition\b", "additionally"),
    (r"\bsuch as\b", "like"),
    (r"\ba lot of\b", "many"),
    (r"\bis not\b", "isn't"),
    (r"\bare not\b", "aren't"),
    (r"\bwas not\b", "wasn't"),
    (r"\bdo not\b", "don't"),
    (r"\bdoes not\b", "doesn't"),
    (r"\bdid not\b", "didn't"),
    (r"\bcannot\b", "can't"),
    (r"\bwill not\b", "won't"),
    (r"\bit is\b", "it's"),
    (r"\bthat is\b", "that's"),
    (r"\bthere is\b", "there's"),
    (r"\bisn't\b", "is not"),
    (r"\bdon't\b", "do not"),
    (r"\bdoesn't\b", "does not"),
    (r"\bcan't\b", "cannot"),
    (r"\bwon't\b", "will not"),
    (r"\bit's\b", "it is"),
    (r"\bhowever\b", "but"),
    (r"\btherefore\b", "so"),
    (r"\balthough\b", "though"),
    (r"\bbecause\b", "since"),
    (r"\bwhether\b", "if"),
    (r"\bamong\b", "amongst"),
    (r"\bbefore\b", "prior to"),
    (r"\bafter\b", "following"),
    (r"\balso\b", "additionally"),
    (r"\boften\b", "frequently"),
    (r"\busing\b", "with"),
    (r"\bmany\b", "numerous"),
    (r"\bvery\b", "highly"),
    (r"\bsaid\b", "stated"),
    (r"\bsays\b", "states"),
)
_FUNCTION_RES = tuple((re.compile(p, re.IGNORECASE), r) for p, r in _FUNCTION_RULES)
_FILLERS = re.compile(
    r"\b(?:very|really|quite|just|actually|basically|simply|indeed|certainly)\s+", re.IGNORECASE
)
_PARENTHETICAL = re.compile(r"\s*\([^()\n]{1,120}\)")
_LEADING_PHRASE = re.compile(
    r"^(?:At|In|On|By|For|During|After|Before|Since|Until|Over|Under|From|According to|Earlier|Later|Today|"
    r"Yesterday|Meanwhile|However|Also|Still|Instead)\b[^,;:.]{0,50},\s+(?=\S)"
)
_APPOSITIVE = re.compile(r",\s+(?![^,]*\b(?:and|or|but|which|who)\b)[^,;:()]{2,40},(?=\s)")
_AN = re.compile(r"\b([Aa])(n?)(\s+)([A-Za-z]+)")
_SUBORDINATORS = "When|If|Although|Though|While|After|Before|Because|Since|Once|Unless|Until|As soon as"
_LEADING_CLAUSE = re.compile(rf"^({_SUBORDINATORS})\s+([^,;:]{{3,120}}),\s+(.+?)([.!?]*)$", re.DOTALL)
_TRAILING_BECAUSE = re.compile(r"^(.+?),?\s+because\s+([^,;:]{3,120}?)([.!?]+)$", re.DOTALL)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])(\s+)(?=[\"'(\[]?[A-Z])")
_TOKENS = re.compile(r"[A-Za-z]+|[^A-Za-z]+")
_CODE_BEFORE = tuple("_./\\@#$<{[=")
_CODE_AFTER = tuple("_(/\\[=@")


@dataclass(frozen=True)
class Strength:
    """How hard to rewrite: probability of substituting an eligible word, and the longest run of
    untouched words allowed before a substitution is forced."""

    p_substitute: float
    max_run: int
    p_function: float
    min_word_sim: float  # MiniLM cosine a synonym must have with the word it replaces


PARAPHRASE = Strength(p_substitute=0.35, max_run=4, p_function=0.8, min_word_sim=0.3)
SIGNIFICANT = Strength(p_substitute=1.0, max_run=1, p_function=1.0, min_word_sim=0.2)


def rng_for(text: str, seed: int, salt: str) -> random.Random:
    """A generator fixed by the text, the seed and the purpose: same input, same rewrite."""
    digest = hashlib.sha256(f"{seed}|{salt}|{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _match_case(template: str, word: str) -> str:
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _inflect(lemma: str, form: str) -> str:
    if form == "s":
        if lemma.endswith(("s", "x", "z", "ch", "sh")):
            return lemma + "es"
        if len(lemma) > 1 and lemma.endswith("y") and lemma[-2] not in "aeiou":
            return lemma[:-1] + "ies"
        return lemma + "s"
    if form == "ed":
        if lemma.endswith("e"):
            return lemma + "d"
        if len(lemma) > 1 and lemma.endswith("y") and lemma[-2] not in "aeiou":
            return lemma[:-1] + "ied"
        return lemma + "ed"
    if form == "ing":
        if lemma.endswith("e") and not lemma.endswith("ee"):
            return lemma[:-1] + "ing"
        return lemma + "ing"
    return lemma


def _lemmas(word: str) -> list[tuple[str, str]]:
    """Candidate (lemma, inflection) readings of a lower-case word form, most specific first."""
    out: list[tuple[str, str]] = []
    if word.endswith("ies"):
        out.append((word[:-3] + "y", "s"))
    if word.endswith("es"):
        out.append((word[:-2], "s"))
    if word.endswith("s") and not word.endswith("ss"):
        out.append((word[:-1], "s"))
    if word.endswith("ied"):
        out.append((word[:-3] + "y", "ed"))
    if word.endswith("ed"):
        out += [(word[:-2], "ed"), (word[:-1], "ed")]
        if len(word) > 4 and word[-3] == word[-4]:
            out.append((word[:-3], "ed"))
    if word.endswith("ing"):
        out += [(word[:-3], "ing"), (word[:-3] + "e", "ing")]
        if len(word) > 5 and word[-4] == word[-5]:
            out.append((word[:-4], "ing"))
    return [(lemma, form) for lemma, form in out if len(lemma) >= 3]


class Paraphraser:
    """Rewrites text with a thesaurus; see the module docstring for what each strength does."""

    def __init__(self, thesaurus: Thesaurus | None = None, max_rank: int = 40000):
        self.thesaurus = thesaurus or Thesaurus.load()
        self.common = common_words()
        self.max_rank = max_rank
        self._vectors: dict[str, np.ndarray] = {}

    # ---- words -------------------------------------------------------------------------------
    def candidates(self, word: str, prev: str | None) -> list[str]:
        """Common single-word synonyms of `word` (lower case) for its likely reading after `prev`,
        inflected like it, most frequent first."""
        th = self.thesaurus
        readings: list[tuple[str, str, str | None]] = []
        for lemma, form in _lemmas(word):
            if lemma in th:
                pos = "verb" if form in ("ed", "ing") else None
                if form == "s":
                    pos = "verb" if prev in ("he", "she", "it", "which", "that", "who") else "noun"
                readings.append((lemma, form, pos))
        if word in th:
            readings.append((word, "", None))
        for lemma, form, pos in readings:
            if pos is None:
                if prev in _VERB_CUES:
                    pos = "verb"
                elif prev in _DETERMINERS:
                    pos = "noun" if th.senses(lemma, "noun") else "adj"
                else:
                    pos = th.dominant_pos(lemma)
            found: set[tuple[int, str]] = set()
            for sense in th.senses(lemma, pos)[:3]:
                for syn in sense.synonyms:
                    syn = syn.lower()
                    if len(syn) < 3 or syn[:4] == lemma[:4] or syn in _CLOSED:
                        continue
                    surface = _inflect(syn, form)
                    rank = self.common.get(surface)
                    if rank is not None and rank < self.max_rank and surface != word:
                        found.add((rank, surface))
            if found:
                return [w for _, w in sorted(found)[:8]]
        return []

    def _similarity(self, pairs: set[tuple[str, str]]) -> None:
        """Fill the word-similarity cache (MiniLM cosine of the two words) for the given pairs, in one batch."""
        from attribution.embeddings import embed

        missing = sorted({w for pair in pairs for w in pair} - self._vectors.keys())
        if missing:
            for w, v in zip(missing, embed(missing, batch_size=256), strict=True):
                self._vectors[w] = v

    def substitute(self, text: str, strength: Strength, rng: random.Random) -> str:
        """Swap words for synonyms so that no run of more than `max_run` words stays untouched,
        where the text allows it.

        Among the thesaurus candidates, the one whose MiniLM word vector is closest to the original
        word is taken (below the strength's `min_word_sim` none is): WordNet's senses do not know the context, the
        embedding rejects the readings that drift ("blaze" -> "hell").
        """
        parts = _TOKENS.findall(text)
        slots: list[tuple[int, str, str | None]] = []
        prev_word: str | None = None
        sentence_start = True
        for i, part in enumerate(parts):
            if not part[0].isalpha():
                if re.search(r"[.!?:]\s|\n", part) or part.endswith(tuple(".!?")):
                    sentence_start = True
                slots.append((i, "", None))
                continue
            lower = part.lower()
            before = parts[i - 1] if i else " "
            after = parts[i + 1] if i + 1 < len(parts) else " "
            eligible = (
                len(part) >= 3
                and lower not in _CLOSED
                and not (part.isupper() and len(part) > 1)
                and (sentence_start or not part[0].isupper())
                and not before.endswith(_CODE_BEFORE)
                and not after.startswith(_CODE_AFTER)
                and not re.search(r"[A-Za-z]'$|\d$", before)
            )
            slots.append((i, lower if eligible else "", prev_word))
            prev_word = lower
            sentence_start = False
        options = {(w, prev): self.candidates(w, prev) for _, w, prev in slots if w}
        self._similarity({(w, c) for (w, _), cands in options.items() for c in cands})
        run = 0
        for i, lower, prev in slots:
            if not lower:
                run += len(re.findall(r"\w+", parts[i])) if not parts[i][0].isalpha() else 1
                continue
            run += 1
            if run > strength.max_run or rng.random() < strength.p_substitute:
                scored = sorted(
                    ((float(self._vectors[lower] @ self._vectors[c]), c) for c in options[(lower, prev)]),
                    reverse=True,
                )
                good = [c for sim, c in scored[:2] if sim >= strength.min_word_sim]
                if good:
                    parts[i] = _match_case(parts[i], good[rng.randrange(len(good))])
                    run = 0
        return "".join(parts)

    # ---- sentences ---------------------------------------------------------------------------
    @staticmethod
    def function_words(sentence: str, p: float, rng: random.Random) -> str:
        """Alternate function words and contractions (one rule per phrase, applied with probability p)."""
        for pattern, repl in _FUNCTION_RES:

            def swap(m: re.Match[str], repl: str = repl) -> str:
                return _match_case(m.group(0), repl) if rng.random() < p else m.group(0)

            sentence = pattern.sub(swap, sentence)
        return sentence

    @staticmethod
    def reorder_clauses(sentence: str) -> str:
        """Move a leading subordinate clause to the end, or a trailing "because" clause to the front."""
        m = _LEADING_CLAUSE.match(sentence.strip())
        if m:
            sub, clause, main, punct = m.groups()
            return f"{main[:1].upper()}{main[1:]} {sub.lower()} {clause}{punct or '.'}"
        m = _TRAILING_BECAUSE.match(sentence.strip())
        if m and "\n" not in sentence:
            main, reason, punct = m.groups()
            first, _, rest = main.partition(" ")
            if first.lower() in _CLOSED:
                first = first.lower()
            return f"Because {reason}, {first} {rest}{punct}"
        return sentence

    def paraphrase(self, text: str, seed: int = 0) -> str:
        """A meaning-preserving rewrite, sentence by sentence."""
        rng = rng_for(text, seed, "paraphrase")
        out = []
        for block in re.split(r"(\n\s*\n)", text):
            if not block.strip() or block.isspace():
                out.append(block)
                continue
            pieces = _SENTENCE_SPLIT.split(block)
            for k in range(0, len(pieces), 2):
                s = self.reorder_clauses(pieces[k])
                s = self.function_words(s, PARAPHRASE.p_function, rng)
                pieces[k] = s
            out.append(self.substitute("".join(pieces), PARAPHRASE, rng))
        return fix_articles("".join(out))

    def significant(self, text: str, seed: int = 0, keep: float = 0.5) -> str:
        """A heavy rewrite: keep the most central sentences, gist first, condensed and reworded."""
        rng = rng_for(text, seed, "significant")
        sentences = [
            s.strip()
            for block in re.split(r"\n\s*\n", text)
            for s in _SENTENCE_SPLIT.split(block)
            if s.strip()
        ]
        if not sentences:
            return text
        kept = _central_sentences(sentences, keep)
        rewritten = []
        for s in kept:
            s = _PARENTHETICAL.sub("", s)
            s = _FILLERS.sub("", s)
            s = _LEADING_PHRASE.sub("", s)
            s = _APPOSITIVE.sub("", s)
            s = _swap_coordinated(s)
            s = re.sub(r"\s+", " ", s).strip()
            s = self.reorder_clauses(s)
            s = self.function_words(s, SIGNIFICANT.p_function, rng)
            rewritten.append(s[:1].upper() + s[1:])
        reworded = [fix_articles(self.substitute(s, SIGNIFICANT, rng)) for s in rewritten]
        reworded = _drop_unreworded(reworded, text)
        paragraphs = [" ".join(reworded[i : i + 4]) for i in range(0, len(reworded), 4)]
        return "\n\n".join(paragraphs)


def fix_articles(text: str) -> str:
    """Make "a"/"an" agree with the next word again after it was replaced."""

    def agree(m: re.Match[str]) -> str:
        a, n, space, nxt = m.groups()
        vowel = nxt[0].lower() in "aeio" or (
            nxt[0].lower() == "u" and not nxt.lower().startswith(("uni", "use", "usu"))
        )
        return f"{a}{'n' if vowel else ''}{space}{nxt}"

    return _AN.sub(agree, text)


def _swap_coordinated(sentence: str) -> str:
    """ "A, and B." -> "B, and a." when both halves are whole clauses of some length."""
    m = re.match(r"^(.{25,}?),\s+(and|but)\s+(.{25,}?)([.!?]+)$", sentence)
    if not m or "\n" in sentence:
        return sentence
    first, conj, second, punct = m.groups()
    head, _, rest = first.partition(" ")
    if head.lower() in _CLOSED:
        head = head.lower()
    return f"{second[:1].upper()}{second[1:]}, {conj} {head} {rest}{punct}"


def _drop_unreworded(
    sentences: list[str], original: str, limit: float = 0.25, keep: float = 0.6
) -> list[str]:
    """Drop the sentences that could not be reworded (names, numbers and set phrases keep long runs of
    the original's 8-grams), worst first, while at least `keep` of the sentences remain."""
    from attribution.text import ngrams, words

    grams = ngrams(words(original), 8)
    share = []
    for s in sentences:
        own = ngrams(words(s), 8)
        share.append(len(own & grams) / len(own) if own else 0.0)
    n_min = max(1, math.ceil(keep * len(sentences)))
    drop = {
        i
        for i in sorted(range(len(sentences)), key=lambda i: -share[i])[: len(sentences) - n_min]
        if share[i] > limit
    }
    return [s for i, s in enumerate(sentences) if i not in drop]


def _central_sentences(sentences: list[str], keep: float) -> list[str]:
    """The top `keep` share of sentences by centrality (mean document frequency of their content
    words), ordered most central first: the text leads with its gist, and side remarks go."""
    tokenized = [
        [w for w in re.findall(r"[a-z]+", s.lower()) if w not in _CLOSED and len(w) > 2] for s in sentences
    ]
    freq = Counter(w for toks in tokenized for w in set(toks))
    scores = [sum(freq[w] for w in toks) / math.sqrt(len(toks) + 1) for toks in tokenized]
    n_keep = max(1, math.ceil(keep * len(sentences)))
    order = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:n_keep]
    return [sentences[i] for i in order]
