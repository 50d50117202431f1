"""Downstream tasks generated from the synthetic corpus, in lm-eval's own task format.

The paper's benchmarks say nothing about a 64-wide model trained for minutes, so the embedded
default also measures what its corpus is built to teach (`cocomix.data.synthetic`):

* `synth_topic`: a document prefix on one latent topic, then a new sentence cut before its
  first noun; the four choices are that noun slot filled from four topics (same word index in
  each topic's list). Only the document's topic is consistent with the prefix. Chance: 25%.
* `synth_recall`: two entities are introduced with their professions ("mira the baker ..."),
  then topic sentences fill the rest of the context; finally one entity's name is given and the
  four choices are words owned by four professions (the entity's, the other entity's and two
  more, all the same word slot). Answering needs the name -> profession binding read from the
  start of the context. Chance: 25%.

Sentences are rendered with the generator's own templates and vocabulary (`INTRO`,
`TOPIC_TEMPLATES`, `SyntheticLanguage.topic_words`, ...), so task text is in-distribution.
Each context is grown sentence by sentence up to a token budget (the model's context length), so
nothing the answer depends on is truncated away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from cocomix.config import SyntheticConfig
from cocomix.data import DataError, SyntheticLanguage, load_concepts, load_manifest
from cocomix.data.synthetic import INTRO, NAME, PROFESSION_WORDS, PT, PW, TA, TN, TOPIC_TEMPLATES, TV

from .offline_tasks import write_if_changed

SYNTHETIC_TASKS = ("synth_topic", "synth_recall")
N_CHOICES = 4


def language_of(data_dir: str | Path) -> SyntheticLanguage:
    """The generator behind a prepared synthetic data folder (checked against its concepts.json)."""
    manifest = load_manifest(data_dir, verify=False)
    if manifest.get("source") != "synthetic":
        raise DataError(f"{data_dir}: synthetic tasks need the synthetic corpus (data.source is {manifest.get('source')!r})")
    lang = SyntheticLanguage(SyntheticConfig(**manifest["data"]["synthetic"]))
    if lang.concept_table() != load_concepts(data_dir):
        raise DataError(f"{Path(data_dir) / 'concepts.json'}: does not match the generator of its manifest")
    return lang


def render(lang: SyntheticLanguage, template: np.ndarray, topic: int, draw: np.ndarray,
           name: int = -1, prof: int = 0) -> list[str]:
    """Fill one template (see cocomix/data/synthetic.py). `draw` picks the word inside each slot's
    list, one index per symbol, so two renderings with equal `draw` differ only in topic/profession."""
    W = lang.cfg.words_per_topic
    out = []
    for sym, d in zip(template, draw):
        if sym >= 0:
            word = int(sym)  # function words: vocab id == index in FUNCTION_WORDS
        elif sym in (TN, TV, TA):
            word = lang.topic_words[topic, (TN, TV, TA).index(sym), d % W]
        elif sym == NAME:
            word = name
        elif sym == PT:
            word = lang.prof_titles[prof]
        elif sym == PW:
            word = lang.prof_words[prof, d % PROFESSION_WORDS]
        else:
            raise ValueError(f"unknown template symbol {sym}")
        out.append(lang.vocab[word])
    return out


class _Budget:
    """Counts tokens of a growing word list, the way the model will see it."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tok, self.max_tokens = tokenizer, max_tokens

    def fits(self, words: list[str], reserve: int) -> bool:
        return len(self.tok(" ".join(words), add_special_tokens=False).input_ids) + reserve <= self.max_tokens


def _topic_sentence(lang, rng, topic):
    tmpl = TOPIC_TEMPLATES[rng.integers(len(TOPIC_TEMPLATES))]
    return render(lang, tmpl, topic, rng.integers(0, 1 << 20, size=len(tmpl)))


def _shuffle_choices(rng, choices: list[str]) -> tuple[list[str], int]:
    order = rng.permutation(len(choices))  # choices[0] is the correct one
    return [choices[i] for i in order], int(np.flatnonzero(order == 0)[0])


def topic_docs(lang: SyntheticLanguage, tokenizer, n_docs: int, max_tokens: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 101])
    budget = _Budget(tokenizer, max_tokens)
    docs = []
    for _ in range(n_docs):
        topic = int(rng.integers(lang.cfg.n_topics))
        others = rng.choice([t for t in range(lang.cfg.n_topics) if t != topic], size=N_CHOICES - 1, replace=False)
        # The question: a new sentence cut before its first topic noun; the choices fill that slot
        # with the same noun index of four topics, so only the topic tells them apart.
        tmpl = TOPIC_TEMPLATES[rng.integers(len(TOPIC_TEMPLATES))]
        cut = int(np.flatnonzero(tmpl == TN)[0])
        stem = render(lang, tmpl[:cut], topic, rng.integers(0, 1 << 20, size=cut))
        noun = int(rng.integers(lang.cfg.words_per_topic))
        options = [lang.vocab[lang.topic_words[t, 0, noun]] for t in [topic, *others]]
        reserve = 1 + max(len(tokenizer(" " + o, add_special_tokens=False).input_ids) for o in options)
        words: list[str] = []
        while True:
            sentence = _topic_sentence(lang, rng, topic)
            if words and not budget.fits(words + sentence + stem, reserve):
                break
            words += sentence
        choices, label = _shuffle_choices(rng, options)
        docs.append({"context": " ".join(words + stem), "choices": choices, "label": label, "topic": topic})
    return docs


def recall_docs(lang: SyntheticLanguage, tokenizer, n_docs: int, max_tokens: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 202])
    budget = _Budget(tokenizer, max_tokens)
    P = lang.cfg.n_professions
    if P < N_CHOICES:
        raise DataError(f"synth_recall needs data.synthetic.n_professions >= {N_CHOICES}, got {P}")
    docs = []
    for _ in range(n_docs):
        topic = int(rng.integers(lang.cfg.n_topics))
        names = rng.choice(lang.names, size=2, replace=False)
        profs = rng.choice(P, size=N_CHOICES, replace=False)  # [0], [1]: the two entities; rest: distractors
        words: list[str] = []
        for e in range(2):
            words += render(lang, INTRO, topic, rng.integers(0, 1 << 20, size=len(INTRO)), int(names[e]), int(profs[e]))
        intro_end = len(words)
        asked = int(rng.integers(2))
        slot = int(rng.integers(PROFESSION_WORDS))
        options = [lang.vocab[lang.prof_words[p, slot]] for p in [profs[asked], profs[1 - asked], *profs[2:]]]
        # Room for " <name>" and the longest " <choice>" (tokenized after the target delimiter).
        name_tokens = len(tokenizer(" " + lang.vocab[names[asked]], add_special_tokens=False).input_ids)
        reserve = 1 + name_tokens + max(len(tokenizer(" " + o, add_special_tokens=False).input_ids) for o in options)
        while True:  # the gap that separates the introductions from the question
            sentence = _topic_sentence(lang, rng, topic)
            if not budget.fits(words + sentence, reserve):
                break
            words += sentence
        words.append(lang.vocab[names[asked]])
        choices, label = _shuffle_choices(rng, options)
        docs.append({"context": " ".join(words), "choices": choices, "label": label,
                     "gap_words": len(words) - 1 - intro_end})
    return docs


def task_config(name: str, data_file: Path, description: str) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        # Absolute: lm-eval resolves relative data_files against the CWD, not the YAML (ecosystem-facts 3a).
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "description": description, "chance": 1.0 / N_CHOICES},
    }


def prepare_synthetic_tasks(data_dir: str | Path, out_dir: str | Path, tokenizer, n_docs: int,
                            max_tokens: int, seed: int = 0) -> list[str]:
    """Write `<task>.jsonl` + `<task>.yaml` for both tasks into `out_dir`; return the task names.

    Deterministic in (corpus generator, tokenizer, n_docs, max_tokens, seed); unchanged files are
    not rewritten, so lm-eval's dataset cache stays valid across checkpoints.
    """
    lang = language_of(data_dir)
    out_dir = Path(out_dir)
    makers = {
        "synth_topic": (topic_docs, "choose the next sentence consistent with the document's latent topic"),
        "synth_recall": (recall_docs, "recall the profession of an entity introduced at the start of the context"),
    }
    for name, (make, description) in makers.items():
        docs = make(lang, tokenizer, n_docs, max_tokens, seed)
        data_file = out_dir / f"{name}.jsonl"
        write_if_changed(data_file, "".join(json.dumps(d) + "\n" for d in docs))
        write_if_changed(out_dir / f"{name}.yaml", yaml.safe_dump(task_config(name, data_file, description), sort_keys=False))
    return list(makers)

