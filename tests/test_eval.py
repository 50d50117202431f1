"""Evaluation: the paper's perplexity protocol, lm-eval on our checkpoints (offline), synthetic tasks,
and `cocomix eval` on a run folder (each checkpoint once, metrics on the training run in MLflow)."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
import torch.nn.functional as F

from conftest import ROOT, SHARED, tiny_overrides

EVAL_DATA = SHARED / "data" / "evals"
needs_eval_data = pytest.mark.skipif(
    not EVAL_DATA.is_dir(), reason=f"local benchmark copies not found at {EVAL_DATA} (set eval.task_data)"
)


def _load(ckpt):
    import cocomix  # noqa: F401  registers the architecture
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(ckpt).eval(), AutoTokenizer.from_pretrained(ckpt)


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference: one unpadded forward pass of context + continuation (split the way
    lm-eval does: trailing spaces of the context move to the continuation, each side encoded alone),
    the continuation's log-probabilities summed."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = (ctx + cont)[-(model.config.n_positions + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)  # (T-1, V)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(targets)), targets][-len(cont):].sum().item()


@pytest.fixture(scope="module")
def harness_synthetic(tiny_data, tiny_teacher, tmp_path_factory):
    from evals.harness import prepare_harness

    _, tok = _load(tiny_teacher)
    return prepare_harness(["synthetic"], task_data=None, work_dir=tmp_path_factory.mktemp("evaltasks"),
                           data_dir=tiny_data, tokenizer=tok, synthetic_docs=120, max_tokens=64)


# ---------------------------------------------------------------- perplexity protocol


def test_heldout_perplexity_is_mean_of_block_means(tiny_data, tiny_teacher):
    from cocomix.data.shards import TokenBlocks
    from evals.perplexity import heldout_perplexity

    model, _ = _load(tiny_teacher)
    out = heldout_perplexity(model, tiny_data, block_size=64, batch_size=7, max_blocks=20)
    # Reference: batch 1 as the official test.py, HF's own shifted mean loss per block.
    blocks = TokenBlocks(tiny_data, "val", 64)
    losses = [model(input_ids=blocks.get_batch([i]), labels=blocks.get_batch([i])).loss.item() for i in range(20)]
    assert out["val_blocks"] == 20
    assert out["val_loss"] == pytest.approx(np.mean(losses), abs=1e-5)
    assert out["val_ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    # All blocks by default: consecutive, non-overlapping, partial tail dropped.
    n_val = sum(s["n_tokens"] for s in blocks.manifest["splits"]["val"]["shards"])
    assert heldout_perplexity(model, tiny_data, 64, batch_size=256)["val_blocks"] == n_val // 64


# ---------------------------------------------------------------- lm-eval log-likelihoods


def _check_samples_match(raw, model, tokenizer, min_requests):
    checked = 0
    for task, samples in raw["samples"].items():
        for sample in samples:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
                want = _direct_loglikelihood(model, tokenizer, context, continuation)
                assert resp[0][0] == pytest.approx(want, abs=1e-4), (task, context[-40:], continuation)
                checked += 1
    assert checked >= min_requests


def test_lm_eval_loglikelihoods_equal_direct_computation_ntp(tiny_teacher, harness_synthetic):
    from evals.harness import make_lm

    model, tok = _load(tiny_teacher)
    use_cache = []  # what every scoring forward was asked (the old calls built a KV cache each time)
    model.register_forward_pre_hook(lambda mod, args, kwargs: use_cache.append(kwargs.get("use_cache")),
                                    with_kwargs=True)
    _, raw = harness_synthetic.run(make_lm(model, tok, batch_size=5), limit=6, log_samples=True)
    assert use_cache and set(use_cache) == {False}
    use_cache.clear()
    _check_samples_match(raw, model, tok, min_requests=2 * 6 * 4)


def test_lm_eval_loglikelihoods_equal_direct_computation_cocomix(tiny_data, tiny_teacher, harness_synthetic):
    from cocomix.config import load_config
    from cocomix.data import load_manifest
    from cocomix.methods import get_method
    from evals.harness import make_lm

    try:
        method = get_method("cocomix")
    except (ImportError, ValueError) as e:  # pragma: no cover - depends on the CoCoMix issue
        pytest.skip(f"method cocomix not available: {e}")
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tiny_data.parent, tiny_data, "method=cocomix",
                                                                 f"teacher.path={tiny_teacher}"))
    manifest = load_manifest(tiny_data, verify=False)
    torch.manual_seed(0)
    model = method.build_model(cfg, manifest["vocab_size"], manifest["eos_id"]).eval()
    assert getattr(model.config, "slot", "concept") == "concept"  # interleaving active at eval (spec 5)
    _, tok = _load(tiny_teacher)
    _, raw = harness_synthetic.run(make_lm(model, tok, batch_size=5), limit=4, log_samples=True)
    _check_samples_match(raw, model, tok, min_requests=2 * 4 * 4)


# ---------------------------------------------------------------- synthetic tasks


def _synthetic_scores(harness, model, tok):
    from evals.harness import make_lm

    metrics, _ = harness.run(make_lm(model, tok, batch_size=64))
    return {t: metrics[f"{t}/acc"] for t in ("synth_topic", "synth_recall")}


def test_synthetic_tasks_untrained_model_at_chance(tiny_teacher, harness_synthetic):
    trained, tok = _load(tiny_teacher)
    torch.manual_seed(0)
    scores = _synthetic_scores(harness_synthetic, type(trained)(trained.config).eval(), tok)
    # 120 documents, 4 choices: chance 0.25 with standard error 0.04.
    assert all(acc < 0.37 for acc in scores.values()), scores


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """The embedded default's language, tokenizer and width (config/tiny.yaml), 4 blocks, trained on
    1.5M tokens in 384 steps of 32 x 128 tokens (the default's 6 blocks and 512-token steps would take
    three times as long), about two minutes on 2 cores, with synthetic tasks built for its corpus. The corpus is
    enlarged to 3M words so those tokens are read once, not repeated: a smaller corpus read twice
    (700k words) leaves topic accuracy near 0.47. Smaller models and corpora (the
    session's tiny teacher) do not learn to use the document's topic."""
    from cocomix.config import load_config
    from cocomix.data.shards import prepare_data
    from cocomix.trainer import train
    from evals.harness import prepare_harness

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(ROOT / "config/tiny.yaml", [f"results_dir={root}", "tracking.enabled=false",
                                                   "data.synthetic.n_tokens=3000000", "train.tokens=1572864",
                                                   "model.n_layer=4", "train.block_size=128",
                                                   "train.global_batch_size=32", "train.micro_batch_size=32",
                                                   "eval.every_tokens=1572864",
                                                   "checkpoint.every_tokens=1572864"])
    prepare_data(cfg, progress=False)
    ckpt = Path(train(cfg, progress=False)["checkpoint"])
    _, tok = _load(ckpt)
    harness = prepare_harness(["synthetic"], task_data=None, work_dir=root / "tasks", data_dir=cfg.data_dir,
                              tokenizer=tok, synthetic_docs=120, max_tokens=cfg.train.block_size)
    return ckpt, harness


@pytest.mark.slow
def test_synthetic_tasks_trained_model_above_chance(trained_tiny):
    ckpt, harness = trained_tiny
    scores = _synthetic_scores(harness, *_load(ckpt))
    # Topic-consistent continuation: far above chance (0.25 +- 0.04 over 120 docs). Recalling an
    # entity's profession across the document is not learned at this scale (it stays near chance);
    # the task is kept so larger runs can show it.
    print("synthetic task accuracy:", scores)
    assert scores["synth_topic"] > 0.5, scores


def test_synthetic_tasks_are_well_formed(tiny_data, tiny_teacher, tmp_path):
    from cocomix.data.synthetic import SyntheticLanguage
    from evals.report import CHANCE
    from evals.synthetic_tasks import language_of, recall_docs, topic_docs

    _, tok = _load(tiny_teacher)
    lang = language_of(tiny_data)
    assert isinstance(lang, SyntheticLanguage)
    topic_of = {}
    for t in range(lang.cfg.n_topics):
        for w in lang.topic_words[t].ravel():
            topic_of[lang.vocab[w]] = t
    prof_of = {lang.vocab[w]: p for p in range(lang.cfg.n_professions) for w in lang.prof_words[p]}
    title_prof = {lang.vocab[lang.prof_titles[p]]: p for p in range(lang.cfg.n_professions)}
    for doc in topic_docs(lang, tok, 30, 64, seed=1):
        content = {topic_of[w] for w in doc["context"].split() if w in topic_of}
        assert content == {doc["topic"]}  # the context shows one topic ...
        assert [topic_of[c] == doc["topic"] for c in doc["choices"]].count(True) == 1  # ... one choice fits
        assert topic_of[doc["choices"][doc["label"]]] == doc["topic"]
        assert len(tok(doc["context"] + " " + doc["choices"][0]).input_ids) <= 64
        assert len(doc["choices"]) == round(1 / CHANCE["synth_topic/acc"])  # the report's chance line
    recall = recall_docs(lang, tok, 30, 64, seed=1)
    assert np.mean([d["gap_words"] for d in recall]) > 4  # topic sentences between introductions and question
    for doc in recall:
        words = doc["context"].split()
        name = words[-1]
        intro = words.index(name)  # "<name> the <title> ..."
        assert words[intro + 1] == "the" and prof_of[doc["choices"][doc["label"]]] == title_prof[words[intro + 2]]
        assert len({prof_of[c] for c in doc["choices"]}) == 4 and doc["gap_words"] >= 0
        assert len(doc["choices"]) == round(1 / CHANCE["synth_recall/acc"])
        assert len(tok(doc["context"] + " " + doc["choices"][0]).input_ids) <= 64


# ---------------------------------------------------------------- offline copies of the paper's tasks


@needs_eval_data
def test_local_copies_convert_to_official_document_counts():
    from evals.offline_tasks import OFFICIAL_DOC_COUNTS, PAPER_TASKS, iter_rows

    for task in PAPER_TASKS:
        assert sum(1 for _ in iter_rows(EVAL_DATA, task)) == OFFICIAL_DOC_COUNTS[task], task


@needs_eval_data
def test_hellaswag_conversion_feeds_lm_eval_preprocessing():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from evals.offline_tasks import iter_rows

    rows = list(iter_rows(EVAL_DATA, "hellaswag"))[:3]
    docs = process_docs(datasets.Dataset.from_list(rows))
    lines = (EVAL_DATA / "hellaswag" / "hellaswag_val_full.klosax.txt").read_text().split("\n")
    assert docs[0]["query"] == lines[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert docs[0]["gold"] == 3 and docs[0]["choices"] == lines[2:6]
    assert docs[1]["query"] == lines[6] and docs[2]["gold"] == int(lines[13])


def test_wikitext_rows_rebuild_into_articles():
    from evals.offline_tasks import wikitext_pages, wikitext_rows

    rows = ["", " = A = \n", "", " a text . \n", "", " = = Sub = = \n", " more \n", "", " = B = \n", " b \n"]
    text = "\n".join(rows)
    assert wikitext_rows(text) == rows
    assert wikitext_pages(rows) == [" = A = \n \n a text . \n \n = = Sub = = \n more \n ", " = B = \n b "]


@needs_eval_data
def test_seven_paper_tasks_run_offline_with_a_limit(tiny_teacher, tmp_path):
    from evals.harness import make_lm, prepare_harness
    from evals.offline_tasks import OFFICIAL_DOC_COUNTS, PAPER_METRICS, PAPER_TASKS

    model, tok = _load(tiny_teacher)
    harness = prepare_harness(["paper"], task_data=EVAL_DATA, work_dir=tmp_path)
    metrics, raw = harness.run(make_lm(model, tok, batch_size=16), limit=2, log_samples=True)
    for task in PAPER_TASKS:
        assert raw["n-samples"][task] == {"original": OFFICIAL_DOC_COUNTS[task], "effective": 2}
        for metric in PAPER_METRICS[task]:
            assert math.isfinite(metrics[f"{task}/{metric}"]), (task, metric)
            assert math.isfinite(metrics[f"{task}/{metric}_stderr"]), (task, metric)
    # lm-eval gives no stderr for WikiText's weighted perplexities: bootstrapped over its documents.
    assert raw["results"]["wikitext"]["word_perplexity_stderr,none"] == "N/A"
    assert "wikitext/word_perplexity_stderr" in raw["cocomix_stderrs"]
    assert set(raw["task_seconds"]) == set(PAPER_TASKS)
    # The group YAMLs written for the CLI (`lm_eval --include_path`) point at absolute converted files.
    group = __import__("yaml").safe_load((tmp_path / "offline" / "piqa_offline.yaml").read_text())
    data_file = Path(group["task"][0]["dataset_kwargs"]["data_files"]["validation"])
    assert data_file.is_absolute() and json.loads(data_file.read_text().splitlines()[0])["label"] == 0
    # Long PIQA/HellaSwag endings overflow the 64-token model; the last-64-token scores match too.
    _check_samples_match({"samples": {t: raw["samples"][t] for t in ("piqa", "winogrande")}}, model, tok, 8)


def test_missing_task_data_names_task_and_option(tmp_path):
    from cocomix.data import DataError
    from evals.offline_tasks import prepare_offline_tasks

    (tmp_path / "piqa").mkdir()
    with pytest.raises(DataError, match=r"^task hellaswag: no local copy at .*set eval.task_data") as e:
        prepare_offline_tasks(tmp_path, tmp_path / "out", ["hellaswag"])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"^task piqa: missing file .*valid.jsonl.*eval.task_data"):
        prepare_offline_tasks(tmp_path, tmp_path / "out", ["piqa"])


# ---------------------------------------------------------------- cocomix eval on a run folder


@pytest.mark.slow
def test_every_seed_is_scored_on_the_same_synthetic_documents(tiny_teacher, tmp_path):
    # The synthetic task documents used to be generated from each run's seed: seeds were scored on
    # different documents, so their differences mixed model and test-set noise.
    from evals.run import evaluate

    ckpt = Path(tiny_teacher)
    common = ["eval.tasks=[synth_topic]", "eval.synthetic_docs=16", "eval.ppl_max_blocks=4",
              f"results_dir={tmp_path}"]
    records = []
    for seed in (0, 1):
        run_dir = tmp_path / f"run-s{seed}"
        shutil.copytree(ckpt.parent.parent, run_dir, ignore=shutil.ignore_patterns("eval.json", "lm_eval_results.json"))
        records.append(evaluate(run_dir / "checkpoints" / ckpt.name, common + [f"seed={seed}"], progress=False)[0])
    generated = sorted(p.name for p in (tmp_path / "tiny" / "eval_tasks" / "synthetic").iterdir())
    assert generated == ["n16-ctx64-seed0"]  # one set of documents for both seeds (eval.task_seed 0)
    assert records[0]["settings"]["task_seed"] == records[1]["settings"]["task_seed"] == 0
    assert records[0]["metrics"]["synth_topic/acc"] == records[1]["metrics"]["synth_topic/acc"]  # same weights, same docs
    other = evaluate(tmp_path / "run-s1" / "checkpoints" / ckpt.name, common + ["seed=1", "eval.task_seed=7"],
                     progress=False)[0]
    assert other["settings"]["task_seed"] == 7  # a changed task seed re-evaluates
    assert sorted(p.name for p in (tmp_path / "tiny" / "eval_tasks" / "synthetic").iterdir()) == [
        "n16-ctx64-seed0", "n16-ctx64-seed7"]


def test_eval_run_folder_twice_evaluates_each_checkpoint_once(tiny_teacher, tmp_path, capsys):
    import mlflow

    from cocomix.cli import main
    from cocomix.files import sha256_file
    from evals.run import LM_EVAL_FILE, RECORD_VERSION, RESULTS_FILE, evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(Path(tiny_teacher).parent.parent, run_dir)
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    tree["eval"]["tasks"] = ["synth_topic"]  # the run's own tasks: its evaluation is eval.json
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("evaltest", artifact_location=(tmp_path / "mlartifacts").as_uri())).info.run_id
    (run_dir / "mlflow_run_id").write_text(run_id)
    overrides = ["eval.tasks=[synth_topic]", "eval.synthetic_docs=16", "eval.ppl_max_blocks=8",
                 "tracking.enabled=true", f"tracking.uri={uri}"]

    capsys.readouterr()
    first = evaluate(run_dir, overrides, progress=True)
    out, err = capsys.readouterr()
    # Plain progress lines on stdout: per checkpoint its start, perplexity, each task, and done;
    # no tqdm bar (stderr is not a terminal here).
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("[")] == [
        f"[{i}/{len(ckpts)}] {c.name} ({json.loads((c / 'checkpoint.json').read_text())['tokens_seen']:,} tokens)"
        for i, c in enumerate(ckpts, 1)]
    task_lines = [line for line in lines if line.startswith("  synth_topic: ")]
    assert len(task_lines) == len(ckpts) and all(re.fullmatch(r"  synth_topic: acc 0\.\d{4} ± 0\.\d{4} \(\d+\.\ds\)", t)
                                                  for t in task_lines), task_lines
    assert sum(line.startswith("  held-out perplexity: val_ppl ") for line in lines) == len(ckpts)
    assert sum(line.endswith("eval.json") for line in lines) == len(ckpts)
    assert "it/s" not in err and "%|" not in err, err[-500:]
    stamps = [(c / RESULTS_FILE).stat().st_mtime_ns for c in ckpts]
    second = evaluate(run_dir, overrides, progress=False)
    assert len(first) == len(ckpts) >= 2 and first == second
    assert [(c / RESULTS_FILE).stat().st_mtime_ns for c in ckpts] == stamps  # nothing re-evaluated
    for ckpt, record in zip(ckpts, first):
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        assert record["tokens_seen"] == meta["tokens_seen"] and record["settings"]["tasks"] == ["synth_topic"]
        assert set(record["metrics"]) >= {"val_loss", "val_ppl", "synth_topic/acc", "synth_topic/acc_stderr"}
        # lm-eval's own results beside eval.json (the file the sealed record names by sha256); every
        # stderr in eval.json is lm-eval's value, none is "N/A".
        lm_file = ckpt / LM_EVAL_FILE
        assert record["lm_eval_results"] == {"file": LM_EVAL_FILE, "sha256": sha256_file(lm_file)}
        lm = json.loads(lm_file.read_text())
        assert set(lm) >= {"results", "versions", "n-shot", "n-samples", "config"} and "samples" not in lm
        stderrs = {k: v for k, v in record["metrics"].items() if k.endswith("_stderr")}
        assert set(stderrs) == {"synth_topic/acc_stderr", "synth_topic/acc_norm_stderr"}
        for key, value in stderrs.items():
            task, metric = key.split("/")
            assert value == lm["results"][task][f"{metric},none"], key
            assert record["metrics"][key[: -len("_stderr")]] == lm["results"][task][f"{metric[:-7]},none"]
        assert lm["n-samples"]["synth_topic"]["effective"] == record["n_docs"]["synth_topic"]["effective"] == 16
        # The per-document scores beside it (what the report's paired tests read): one per document,
        # their mean the task's accuracy.
        from evals.report.runs import read_samples

        docs = read_samples(ckpt, record)["synth_topic"]
        assert record["lm_eval_samples"]["file"] == "lm_eval_samples.json.gz"
        assert docs["doc_id"] == list(range(16)) and set(docs["acc"]) <= {0.0, 1.0}
        assert sum(docs["acc"]) / 16 == pytest.approx(record["metrics"]["synth_topic/acc"])
        assert sum(docs["acc_norm"]) / 16 == pytest.approx(record["metrics"]["synth_topic/acc_norm"])
        assert record["cocomix_stderrs"] == [] and record["settings"]["record_version"] == RECORD_VERSION
    # MLflow: one point per checkpoint, at step = tokens seen.
    for name in ("eval/val_ppl", "eval/synth_topic/acc"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == sorted(r["tokens_seen"] for r in first)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "eval/val_ppl")}
    assert logged == {r["tokens_seen"]: pytest.approx(r["metrics"]["val_ppl"]) for r in first}

    # Bad input through the CLI: one line, non-zero exit.
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cocomix: error: ") and "nope: not found" in err


def test_train_with_eval_leaves_what_cocomix_eval_would_and_nothing_for_it_to_redo(tiny_data, tmp_path, capsys):
    """`cocomix train --eval` (each DAG training job): every checkpoint evaluated in the training process,
    the run's eval_summary.json written last; `cocomix eval` on the run afterwards finds nothing to do."""
    from cocomix.cli import main
    from cocomix.config import load_config
    from evals.run import RESULTS_FILE

    tiny = str(ROOT / "config/tiny.yaml")
    over = tiny_overrides(tmp_path, tiny_data, "train.tokens=16384", "eval.every_tokens=8192",
                          "checkpoint.every_tokens=8192", "eval.tasks=[synth_topic]", "eval.synthetic_docs=8",
                          "eval.ppl_max_blocks=8", "eval.max_blocks=8", "run_name=ev")
    assert main(["train", "--config", tiny, "--no-progress", "--eval", *over]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"done: 2 checkpoint(s) evaluated -> {load_config(tiny, over).run_dir}"
    run_dir = load_config(tiny, over).run_dir
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert summary["tokens_seen"] == [8192, 16384] and summary["checkpoints"] == [str(c) for c in ckpts]
    records = [json.loads((c / RESULTS_FILE).read_text()) for c in ckpts]
    assert summary["final"] == records[-1]["metrics"] and "synth_topic/acc" in summary["final"]
    stamps = [(c / RESULTS_FILE).stat().st_mtime_ns for c in ckpts]
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("already evaluated") == 2, out
    assert [(c / RESULTS_FILE).stat().st_mtime_ns for c in ckpts] == stamps


def test_t_interval_quantiles_are_students_at_every_degree_of_freedom():
    # Two-sided 95% quantiles from a printed t table (Abramowitz & Stegun 26.10); the hand table
    # this replaced gave 2.228 at 11 degrees of freedom and 1.96 from 30 on.
    from evals.report import t95

    for df, want in {1: 12.7062, 4: 2.7764, 11: 2.2010, 25: 2.0595, 30: 2.0423, 60: 2.0003, 120: 1.9799}.items():
        assert t95(df) == pytest.approx(want, abs=1e-4), df


def test_weighted_perplexity_stderr_is_a_bootstrap_of_lm_evals_own_aggregate():
    # lm-eval reports "N/A" for weighted perplexities; ours resamples documents. Its aggregate is
    # lm-eval's (same function of the pairs), and its stderr that of an independent bootstrap.
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    from evals.harness import WEIGHTED_AGGREGATES, bootstrap_weighted_stderr

    rng = np.random.default_rng(0)
    words = rng.integers(200, 2000, size=62)
    pairs = [(-float(w) * rng.uniform(4, 6), int(w)) for w in words]  # (log-likelihood, words) per document
    ll, w = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assert WEIGHTED_AGGREGATES["word_perplexity"](ll.sum(), w.sum()) == pytest.approx(weighted_perplexity(pairs))
    assert WEIGHTED_AGGREGATES["bits_per_byte"](ll.sum(), w.sum()) == pytest.approx(bits_per_byte(pairs))
    se = bootstrap_weighted_stderr(pairs, WEIGHTED_AGGREGATES["word_perplexity"])
    assert se == bootstrap_weighted_stderr(pairs, WEIGHTED_AGGREGATES["word_perplexity"])  # seeded: reproducible
    reference = []
    for _ in range(4000):
        i = rng.integers(0, len(pairs), len(pairs))
        reference.append(math.exp(-ll[i].sum() / w[i].sum()))
    assert se == pytest.approx(np.std(reference, ddof=1), rel=0.1)
    assert bootstrap_weighted_stderr(pairs[:1], WEIGHTED_AGGREGATES["word_perplexity"]) is None


def test_an_evaluation_with_a_limit_or_other_tasks_is_written_beside_the_runs_own(tiny_teacher, tmp_path):
    # The README's smoke test (`--limit 20`) replaced the checkpoint's DAG evaluation: the report then
    # showed "-" cells with no warning and `snakemake -n` saw nothing to redo. Now eval.json is only ever
    # the run's own evaluation (its config's tasks, every document); others go beside it.
    import mlflow

    from evals.report.runs import Run, warn_mixed_settings
    from evals.run import RESULTS_FILE, evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(Path(tiny_teacher).parent.parent, run_dir)
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    tree["eval"]["tasks"] = ["synth_topic"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("beside", artifact_location=(tmp_path / "mlartifacts").as_uri())).info.run_id
    (run_dir / "mlflow_run_id").write_text(run_id)
    common = ["eval.synthetic_docs=16", "eval.ppl_max_blocks=8", "tracking.enabled=true", f"tracking.uri={uri}"]

    (full,) = evaluate(ckpt, common, progress=False)
    own = (ckpt / RESULTS_FILE).read_bytes()
    logged = client.get_metric_history(run_id, "eval/synth_topic/acc")
    assert len(logged) == 1 and full["settings"]["limit"] is None
    (limited,) = evaluate(ckpt, common + ["eval.limit=4"], progress=False)
    (other,) = evaluate(ckpt, common + ["eval.tasks=[]"], progress=False)
    assert (ckpt / RESULTS_FILE).read_bytes() == own  # never over the run's own
    beside = sorted(p.name for p in ckpt.glob("eval-*.json"))
    assert len(beside) == 2 and sum(n.startswith("eval-limit4-") for n in beside) == 1, beside
    assert limited["settings"]["limit"] == 4 and limited["n_docs"] == {"synth_topic": {"original": 16, "effective": 4}}
    assert other["settings"]["tasks"] == [] and "synth_topic/acc" not in other["metrics"]
    assert len(list(ckpt.glob("lm_eval_results-limit4-*.json"))) == 1
    assert client.get_metric_history(run_id, "eval/synth_topic/acc") == logged  # MLflow keeps the run's own
    (again,) = evaluate(ckpt, common + ["eval.limit=4"], progress=False)
    assert again == limited  # found beside, not redone

    # The report warns when one cell averages evaluations made under different settings.
    def run(seed, settings):
        return Run(f"ntp-base-s{seed}", "ntp", "base", seed, None, run_dir, None, {}, [], eval_settings=settings)

    lines = warn_mixed_settings([run(0, full["settings"]), run(1, limited["settings"]), run(2, full["settings"])])
    assert lines == ["warning: report: ntp at base: its runs' evaluations differ in limit (ntp-base-s0, ntp-base-s1, "
                     "ntp-base-s2); rerun `cocomix eval --force` on them with one setting"]
    assert warn_mixed_settings([run(0, full["settings"]), run(1, full["settings"])]) == []

    # A run whose own config limits the documents (config/gutenberg-cpu.yaml: eval.limit 100): that
    # limit is its own evaluation, eval.json and eval_summary.json (the DAG's output). Before, it went
    # beside as eval-limit100-*.json and every training job of that config failed in the DAG.
    tree["eval"]["limit"] = 4
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    for stale in [*run_dir.glob("checkpoints/*/eval*.json"), run_dir / "eval_summary.json"]:
        stale.unlink(missing_ok=True)
    results = evaluate(run_dir, common, progress=False)
    assert [r["settings"]["limit"] for r in results] == [4] * len(results) and (ckpt / RESULTS_FILE).is_file()
    assert not list(run_dir.glob("checkpoints/*/eval-*.json")) and (run_dir / "eval_summary.json").is_file()
