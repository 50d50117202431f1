"""An embedded artificial language whose documents are driven by latent concepts.

Why: CoCoMix claims to help a model learn *concepts*. Real corpora do not tell us what the
concepts are, so the default corpus is one where they are known by construction and act over
the whole document, not just the next word:

* Each document draws 1-2 latent **topics** (`max_topics_per_doc`). Every topic owns its own
  content words (nouns, verbs and adjectives, or with `parts_of_speech: false` one pool that fills
  every content slot), so once a few content words have been seen, the topic (and hence the
  vocabulary of the rest of the document) is predictable.
* Each document introduces 1-3 named **entities**, each with a **profession** that is stated
  once, when introduced ("mira the baker ..."). Later sentences about the entity use words
  owned by that profession, so predicting them requires remembering the introduction, possibly
  hundreds of words back. Names are drawn per document, so a name carries no information
  by itself: the binding name -> profession must be read from the context.
* Shared function words glue sentences together via a few templates.

Every word carries ground-truth concepts in a fixed number of slots,
`[topic id or 0, profession id or 0]`, with ids

    0                                   none (function words)
    1 .. n_topics                       topic k-1
    n_topics+1 .. n_topics+n_professions  profession p (title word, profession words, and the
                                          name of an entity holding that profession)

`concept_table()` describes every id (name, kind, words); it is written to `concepts.json`.

Generation is vectorised per document (templates are arrays of symbols filled with numpy
fancy indexing), so several million words take a few seconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..config import SyntheticConfig

N_SLOTS = 2
SLOT_NAMES = ("topic", "profession")

FUNCTION_WORDS = ("the", "a", "and", "with", "of", "to", "then", "while", "near", ".")

# Template symbols. Non-negative codes are literal function words (index into FUNCTION_WORDS);
# negative codes are filled per sentence.
TN, TV, TA = -1, -2, -3  # topic noun / verb / adjective (of the sentence's topic)
NAME, PT, PW = -4, -5, -6  # entity name / its profession title / a word of its profession
_F = {w: i for i, w in enumerate(FUNCTION_WORDS)}


def _t(*items: str | int) -> np.ndarray:
    return np.array([_F[x] if isinstance(x, str) else x for x in items], dtype=np.int64)


# Introduces an entity: the only place its profession title appears next to its name.
INTRO = _t(NAME, "the", PT, TV, "a", TA, TN, ".")
# Topic-only sentences.
TOPIC_TEMPLATES = [
    _t("the", TA, TN, TV, "the", TN, "."),
    _t("a", TN, "and", "a", TN, TV, "near", "the", TN, "."),
    _t("then", "the", TN, TV, TA, "."),
    _t("the", TN, "of", "the", TA, TN, TV, "to", "a", TN, "."),
]
# Sentences about an already introduced entity: its profession words recur.
ENTITY_TEMPLATES = [
    _t(NAME, PW, "the", TA, TN, "."),
    _t(NAME, TV, "the", TN, "with", "a", PW, "."),
    _t("then", NAME, PW, "while", "the", TN, TV, "."),
]

SENTENCES_PER_DOC = (8, 40)  # uniform range, inclusive-exclusive
P_ENTITY_SENTENCE = 0.4
PROFESSION_WORDS = 12  # words owned by each profession besides its title
N_NAMES = 64


@dataclass
class SyntheticDoc:
    """One generated document.

    `text` is the words joined by single spaces. `word_ends[i]` is the exclusive character end of
    word i and `word_concepts[i]` its concept slots, so any character span (e.g. a BPE token's
    offsets) can be mapped back to the concepts of the word it falls in.
    """

    text: str
    word_ends: np.ndarray  # (n_words,) int64
    word_concepts: np.ndarray  # (n_words, N_SLOTS) uint16


class SyntheticLanguage:
    """The vocabulary and concept structure for one `SyntheticConfig` (deterministic from its seed)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        T, W, P = cfg.n_topics, cfg.words_per_topic, cfg.n_professions
        n_pos = 3 if cfg.parts_of_speech else 1
        n_content = n_pos * T * W + P * (1 + PROFESSION_WORDS) + N_NAMES
        words = _pseudo_words(rng, n_content, exclude=set(FUNCTION_WORDS))

        # Global vocabulary: function words, topic words [topic][pos][i], profession titles,
        # profession words [prof][i], names. Arrays of vocab ids let templates be filled by indexing.
        self.vocab: list[str] = list(FUNCTION_WORDS) + words
        ids = np.arange(len(FUNCTION_WORDS), len(self.vocab))
        k = 0

        def take(n: int) -> np.ndarray:
            nonlocal k
            out = ids[k : k + n]
            k += n
            return out

        # [topic, pos, i]: pos 0 noun, 1 verb, 2 adjective; without parts of speech all three rows
        # are the topic's one pool, so every user of `topic_words` indexes it the same way.
        self.topic_words = np.repeat(take(n_pos * T * W).reshape(T, n_pos, W), 3 // n_pos, axis=1)
        self.prof_titles = take(P)
        self.prof_words = take(P * PROFESSION_WORDS).reshape(P, PROFESSION_WORDS)
        self.names = take(N_NAMES)

        # Static concepts per vocab id; names get their profession per document.
        self.word_concepts = np.zeros((len(self.vocab), N_SLOTS), dtype=np.uint16)
        for t in range(T):
            self.word_concepts[self.topic_words[t].ravel(), 0] = self.topic_id(t)
        for p in range(P):
            self.word_concepts[self.prof_titles[p], 1] = self.profession_id(p)
            self.word_concepts[self.prof_words[p], 1] = self.profession_id(p)
        self._vocab_arr = np.array(self.vocab, dtype=object)

    # ---- concept ids ----
    def topic_id(self, t: int) -> int:
        return 1 + t

    def profession_id(self, p: int) -> int:
        return 1 + self.cfg.n_topics + p

    @property
    def n_concepts(self) -> int:
        return 1 + self.cfg.n_topics + self.cfg.n_professions

    def concept_table(self) -> dict:
        """JSON-ready description of every concept id (written to `concepts.json`)."""
        v = self.vocab
        concepts = [{"id": 0, "name": "none", "kind": "none", "words": list(FUNCTION_WORDS)}]
        for t in range(self.cfg.n_topics):
            tw = self.topic_words[t]
            concepts.append({
                "id": self.topic_id(t), "name": f"topic_{t}", "kind": "topic",
                "words": [v[i] for i in dict.fromkeys(tw.ravel())],
                "nouns": [v[i] for i in tw[0]], "verbs": [v[i] for i in tw[1]], "adjectives": [v[i] for i in tw[2]],
            })  # fmt: skip
        for p in range(self.cfg.n_professions):
            title = v[self.prof_titles[p]]
            concepts.append({
                "id": self.profession_id(p), "name": f"profession_{title}", "kind": "profession",
                "title": title, "words": [title] + [v[i] for i in self.prof_words[p]],
            })  # fmt: skip
        return {
            "n_slots": N_SLOTS,
            "slot_names": list(SLOT_NAMES),
            "n_concepts": self.n_concepts,
            "concepts": concepts,
            "entity_names": [v[i] for i in self.names],
            "note": "entity names carry the profession concept of the entity they name in that document",
        }

    # ---- generation ----
    def documents(self, n_words: int | None = None) -> Iterator[SyntheticDoc]:
        """Yield documents until about `n_words` words (default `cfg.n_tokens`) were produced."""
        n_words = self.cfg.n_tokens if n_words is None else n_words
        rng = np.random.default_rng([self.cfg.seed, 1])
        produced = 0
        while produced < n_words:
            doc = self._document(rng)
            produced += len(doc.word_ends)
            yield doc

    def _document(self, rng: np.random.Generator) -> SyntheticDoc:
        cfg = self.cfg
        W = cfg.words_per_topic
        # Latent variables of the document.
        topics = rng.choice(cfg.n_topics, size=rng.integers(1, cfg.max_topics_per_doc + 1), replace=False)
        topic_p = np.array([1.0]) if len(topics) == 1 else np.array([0.7, 0.3])
        n_ent = int(rng.integers(1, 4))
        ent_names = rng.choice(self.names, size=n_ent, replace=False)
        ent_prof = rng.integers(0, cfg.n_professions, size=n_ent)

        # Sentence plan (one small Python loop per sentence, not per word).
        n_sent = int(rng.integers(*SENTENCES_PER_DOC))
        is_ent = rng.random(n_sent) < P_ENTITY_SENTENCE
        sent_ent = rng.integers(0, n_ent, size=n_sent)
        sent_topic = topics[rng.choice(len(topics), size=n_sent, p=topic_p)]
        tmpl_pick = rng.integers(0, 1 << 30, size=n_sent)
        introduced = np.zeros(n_ent, dtype=bool)
        templates = []
        for s in range(n_sent):
            if is_ent[s]:
                e = sent_ent[s]
                if not introduced[e]:
                    introduced[e] = True
                    templates.append(INTRO)
                else:
                    templates.append(ENTITY_TEMPLATES[tmpl_pick[s] % len(ENTITY_TEMPLATES)])
            else:
                templates.append(TOPIC_TEMPLATES[tmpl_pick[s] % len(TOPIC_TEMPLATES)])

        # Fill all symbols of the document at once.
        sym = np.concatenate(templates)
        sent_of = np.repeat(np.arange(n_sent), [len(t) for t in templates])
        w_topic, w_ent = sent_topic[sent_of], sent_ent[sent_of]
        w_prof = ent_prof[w_ent]
        n = len(sym)
        word = sym.copy()  # literal function words are already vocab ids
        draw = rng.integers(0, W, size=n)
        for code, pos in ((TN, 0), (TV, 1), (TA, 2)):
            m = sym == code
            word[m] = self.topic_words[w_topic[m], pos, draw[m]]
        m = sym == NAME
        word[m] = ent_names[w_ent[m]]
        m = sym == PT
        word[m] = self.prof_titles[w_prof[m]]
        m = sym == PW
        word[m] = self.prof_words[w_prof[m], draw[m] % PROFESSION_WORDS]

        concepts = self.word_concepts[word]  # fancy indexing copies
        m = sym == NAME
        concepts[m, 1] = self.profession_id(0) + w_prof[m]
        words = self._vocab_arr[word]
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=n)
        word_ends = np.cumsum(lengths + 1) - 1  # words are separated by one space
        return SyntheticDoc(text=" ".join(words), word_ends=word_ends, word_concepts=concepts)


def _pseudo_words(rng: np.random.Generator, n: int, exclude: set[str]) -> list[str]:
    """`n` distinct pronounceable words of 2-3 consonant-vowel syllables (deterministic from rng)."""
    onsets = list("bdfgklmnprstvz") + ["sh", "ch", "tr", "pl"]
    vowels = list("aeiou")
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(k))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
