"""`cocomix eval`: evaluate one checkpoint, or every checkpoint of a run folder, each once.

For each checkpoint (a Hugging Face folder `runs/<run>/checkpoints/step_NNNNNNN/`):

1. held-out perplexity by the paper's protocol on all validation blocks (`evals/perplexity.py`);
2. lm-evaluation-harness tasks (`evals/harness.py`), zero-shot, each value with its standard
   error (`<task>/<metric>_stderr`);
3. `<checkpoint>/lm_eval_results.json`: lm-eval's own results (results, versions, n-shot,
   n-samples, config, task configs), then `<checkpoint>/eval.json`, both written atomically;
   eval.json (last, sealed) marks the checkpoint as done for these settings, so a second
   `cocomix eval` of the run folder skips it, and a damaged one is evaluated again;
4. the same numbers on the training run's MLflow run as `eval/<task>/<metric>` and
   `eval/val_ppl`, with step = tokens seen, so they plot beside the training curves.

Settings come from the run's resolved `config.yaml` (section `eval`), then dotted overrides.

Progress (on unless --no-progress): one plain line on stdout, flushed, when each checkpoint starts,
when its held-out perplexity and each task are done (task, key metric, seconds) and when it is
done; tqdm bars (on stderr) only when stderr is a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# (importing the cocomix package registers the "cocomix" architecture with the Auto classes)
from cocomix.config import Config, config_from_dict, load_config, parse_overrides, read_yaml, _set_dotted
from cocomix.data import DataError
from cocomix.checkpoints import find_checkpoints, read_meta, model_damage
from cocomix.progress import use_bar
from cocomix.files import (atomic_write_bytes, atomic_write_json, atomic_write_text, clear_stale_tmp,
                           read_sealed_json, sha256_json, sha256_text, write_sealed_json)
from cocomix.tracking import open_tracker

from .harness import make_lm, paper_summary, prepare_harness, set_quiet
from .offline_tasks import PAPER_METRICS
from .perplexity import heldout_perplexity

RESULTS_FILE = "eval.json"
LM_EVAL_FILE = "lm_eval_results.json"
SAMPLES_FILE = "lm_eval_samples.json.gz"  # per-document scores of every task (evals/harness.per_document)
# The parts of lm-eval's output kept beside eval.json (JSON-serialisable; samples are left out).
LM_EVAL_PARTS = ("results", "versions", "n-shot", "n-samples", "config", "configs", "higher_is_better",
                 "group_subtasks", "lm_eval_version")
# 2: standard errors in "metrics" and lm_eval_results.json beside eval.json (older records are redone).
RECORD_VERSION = 2


def load_eval_config(run_dir: Path | None, config_path: str | None, overrides: list[str]) -> Config:
    """The run's resolved config (or --config / defaults for a lone checkpoint) plus overrides."""
    if run_dir is None:
        return load_config(config_path, overrides)
    tree = read_yaml(run_dir / "config.yaml") or {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def _settings(cfg: Config, tasks: list[str]) -> dict[str, Any]:
    """What an eval.json's numbers depend on besides the weights (a changed setting re-evaluates)."""
    ev = cfg.eval
    return {
        "tasks": tasks,
        "limit": ev.limit,
        "task_data": str(Path(ev.task_data).resolve()) if ev.task_data else None,
        "synthetic_docs": ev.synthetic_docs,
        "task_seed": ev.task_seed,
        "ppl_block_size": cfg.train.block_size,
        "ppl_max_blocks": ev.ppl_max_blocks,
        "num_fewshot": 0,
        "record_version": RECORD_VERSION,
    }


def _log_tracked(cfg: Config, run_dir: Path | None, tokens_seen: int, metrics: dict[str, float]) -> dict:
    """Log on the training run's tracked run (step = tokens seen); returns its id as the record's
    `<backend>_run_id` ({} without tracking). A run that trained without its backend is sent first;
    an unreachable store warns once and leaves the run pending (eval.json is the record)."""
    if run_dir is None:
        return {}
    tracker = open_tracker(cfg, run_dir, create=False, resume_status=False)
    try:
        return {tracker.id_key: tracker.log_eval(tokens_seen, metrics)} if tracker.id_key else {}
    finally:
        tracker.close()


@dataclass
class _Evaluation:
    """What every checkpoint evaluated by one `evaluate` call shares."""

    cfg: Config
    run_dir: Path | None
    tasks: list[str]
    device: torch.device
    autocast: torch.dtype | None
    progress: bool  # plain progress lines on stdout
    versions: dict[str, str]
    bars: bool = False  # tqdm bars: progress on and stderr a terminal
    harness: Any = None  # built on the first checkpoint that needs it (task conversion + index)


def evaluate(
    path: str | Path,
    overrides: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint under `path` not yet evaluated with these settings; returns the
    results of all of them (freshly computed or read back)."""
    import lm_eval

    run_dir, checkpoints = find_checkpoints(path)
    cfg = load_eval_config(run_dir, config_path, list(overrides or []))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Same precision rule as training (bf16 autocast on CUDA unless fp32 is asked for), for every method.
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and dev.type == "cuda")
    tasks = _tasks(cfg)
    # The run's own evaluation (its config's tasks and document limit) is eval.json; another goes beside it.
    own_cfg = load_eval_config(run_dir, None, []) if run_dir is not None else cfg
    own_tasks, own_limit = _tasks(own_cfg), own_cfg.eval.limit
    bars = use_bar(progress)  # tqdm bars only on a terminal
    set_quiet(bars)
    run = _Evaluation(cfg, run_dir, tasks, dev, torch.bfloat16 if use_bf16 else None, progress,
                      {"lm_eval": lm_eval.__version__, "torch": torch.__version__}, bars=bars)

    settings = _settings(cfg, tasks)  # the same for every checkpoint, and so is the file it goes to
    name = results_name(settings, own_tasks, own_limit)
    if name != RESULTS_FILE:
        why = [f"limited to {settings['limit']} documents a task"] if settings["limit"] != own_limit else []
        why += [f"tasks {tasks}, not the run's own {own_tasks}"] if tasks != own_tasks else []
        print(f"{'; '.join(why)}: written beside the run's evaluation as {name} (the report and MLflow take "
              "eval.json only)", flush=True)
    results = []
    for i, ckpt in enumerate(checkpoints, 1):
        problem = model_damage(ckpt)
        if problem:
            raise DataError(f"checkpoint {ckpt} is damaged: {problem}; it cannot be evaluated")
        meta = read_meta(ckpt)
        clear_stale_tmp(ckpt)  # an eval.json a killed evaluation did not finish
        out_path = ckpt / name
        done = None if force else _previous_result(out_path, settings)
        if done is not None:
            if progress:
                print(f"[{i}/{len(checkpoints)}] {ckpt.name}: already evaluated ({out_path})", flush=True)
            results.append(done)
            continue
        if progress:
            print(f"[{i}/{len(checkpoints)}] {ckpt.name} ({meta['tokens_seen']:,} tokens)", flush=True)
        results.append(_evaluate_checkpoint(run, ckpt, meta, settings, out_path))
    if name == RESULTS_FILE and run_dir is not None and Path(path).resolve() == run_dir.resolve():
        # A run-level record (the DAG's output for "every checkpoint of this run is evaluated").
        clear_stale_tmp(run_dir)
        atomic_write_json(run_dir / "eval_summary.json", {
            "checkpoints": [r["checkpoint"] for r in results],
            "tokens_seen": [r["tokens_seen"] for r in results],
            "final": results[-1]["metrics"] if results else {},
        }, indent=1)
    return results


def _tasks(cfg: Config) -> list[str]:
    tasks = list(cfg.eval.tasks)
    if cfg.data.source != "synthetic" and "synthetic" in tasks:
        tasks.remove("synthetic")  # the alias means "if the corpus has a generator"
    return tasks


def results_name(settings: dict[str, Any], own_tasks: list[str], own_limit: int | None = None) -> str:
    """eval.json for the run's own evaluation (its config's tasks and `eval.limit`): what the DAG, the
    report and MLflow read. One with another document limit (`--limit`) or other tasks goes beside it,
    `eval-limit<N>-<settings sha>.json`, never over it (a smoke test once replaced the DAG's record).
    (Until 2026-12-07 a run whose own config limits the documents, as config/gutenberg-cpu.yaml does,
    had its own evaluation put beside too, and the DAG waited for an eval_summary.json never written.)"""
    if settings["limit"] == own_limit and settings["tasks"] == own_tasks:
        return RESULTS_FILE
    limit = f"limit{settings['limit']}-" if settings["limit"] is not None else ""
    return f"eval-{limit}{sha256_json(settings)[:8]}.json"


def _previous_result(out_path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's eval.json if it was made with these settings, else None."""
    if not out_path.is_file():
        return None
    done = read_sealed_json(out_path)
    if done is None:
        print(f"warning: {out_path} is damaged (not the record it was written as); evaluating again",
              file=sys.stderr, flush=True)
        return None
    done.pop("sha256")  # the record as `_evaluate_checkpoint` returned it
    return done if done.get("settings") == settings else None


def _evaluate_checkpoint(run: _Evaluation, ckpt: Path, meta: dict, settings: dict[str, Any],
                         out_path: Path) -> dict[str, Any]:
    """Perplexity and tasks of one checkpoint -> its eval.json (written last) and the MLflow run; an
    evaluation beside it (`results_name`) is not sent to MLflow, whose eval/ metrics are the run's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, ev = run.cfg, run.cfg.eval
    own = out_path.name == RESULTS_FILE
    lm_file = LM_EVAL_FILE if own else "lm_eval_results" + out_path.name.removeprefix("eval")  # -limit8-<sha>.json
    samples_file = SAMPLES_FILE if own else "lm_eval_samples" + out_path.name.removeprefix("eval") + ".gz"
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(run.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}
    if (cfg.data_dir / "manifest.json").is_file():
        ppl = heldout_perplexity(model, cfg.data_dir, cfg.train.block_size, ev.batch_size, ev.ppl_max_blocks,
                                 run.autocast, run.bars)
        metrics.update(ppl)
        seconds["perplexity"] = time.time() - t0
        if run.progress:
            print(f"  held-out perplexity: val_ppl {ppl['val_ppl']:.4f} over {ppl['val_blocks']} blocks "
                  f"({seconds['perplexity']:.1f}s)", flush=True)
    elif run.progress:
        print(f"  no prepared data at {cfg.data_dir}: held-out perplexity skipped", flush=True)
    raw = _run_tasks(run, model, tokenizer, metrics, seconds) if run.tasks else None
    metrics.update(paper_summary(metrics, metrics.get("val_ppl")))
    n_docs, clipped = (raw.get("n-samples", {}), raw["clipped_continuations"]) if raw else ({}, 0)

    record = {
        "checkpoint": str(ckpt.resolve()),
        "step": meta["step"],
        "tokens_seen": meta["tokens_seen"],
        "method": meta.get("method"),
        "settings": settings,
        "metrics": metrics,
        "n_docs": n_docs,
        "clipped_continuations": clipped,
        # stderrs lm-eval gives none for, bootstrapped over documents by evals/harness.py
        "cocomix_stderrs": raw["cocomix_stderrs"] if raw else [],
        "seconds": seconds,
        "device": str(run.device),
        "harness_batch_size": cfg.eval.harness_batch_size,  # the lm_eval command of a model card repeats it
        "versions": dict(run.versions),
    }
    if own:
        record.update(_log_tracked(cfg, run.run_dir, meta["tokens_seen"], metrics))
    if raw is not None:  # its sha256 in the sealed record: a reader can tell it belongs to this eval.json
        record["lm_eval_results"] = {"file": lm_file, "sha256": write_lm_eval_results(ckpt / lm_file, raw)}
        record["lm_eval_samples"] = {"file": samples_file,
                                     "sha256": write_samples(ckpt / samples_file, raw.get("per_doc", {}))}
    else:
        (ckpt / lm_file).unlink(missing_ok=True)  # no tasks this time: no stale results beside it
        (ckpt / samples_file).unlink(missing_ok=True)
    write_sealed_json(out_path, record)  # last: its presence means "done"; sealed: damage is seen and redone
    if run.progress:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("val_ppl", "avg_acc") or k.endswith(
            ("/acc", "/acc_norm", "/perplexity", "/word_perplexity"))}
        print(f"  {json.dumps(shown)}  ({time.time() - t0:.1f}s) -> {out_path}", flush=True)
    return record


def write_lm_eval_results(path: Path, raw: dict[str, Any]) -> str:
    """lm-eval's own results dict (its JSON-serialisable parts) beside eval.json, atomically; values
    JSON cannot hold (a torch dtype in "config", functions in task configs) become strings, as in
    lm-eval's own output files."""
    from lm_eval.utils import handle_non_serializable

    kept = {part: raw[part] for part in LM_EVAL_PARTS if part in raw}
    text = json.dumps(kept, indent=1, default=handle_non_serializable, sort_keys=True)
    atomic_write_text(path, text)
    return sha256_text(text)


def write_samples(path: Path, per_doc: dict[str, dict[str, list]]) -> str:
    """Every task's per-document scores, gzip-compressed JSON (no timestamp: the same scores give the
    same bytes), atomically; returns the sha256 of the compressed bytes."""
    import gzip
    import hashlib

    data = gzip.compress(json.dumps(per_doc, sort_keys=True, separators=(",", ":")).encode(), mtime=0)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def key_metric(task: str, metrics: dict[str, float]) -> str | None:
    """The metric a progress line shows for a task: the paper's, else accuracy, else the first."""
    for metric in (*PAPER_METRICS.get(task, ()), "acc", "acc_norm"):
        if f"{task}/{metric}" in metrics:
            return metric
    return next((k.split("/", 1)[1] for k in metrics if not k.endswith("_stderr")), None)


def _task_line(task: str, metrics: dict[str, float], seconds: float) -> str:
    metric = key_metric(task, metrics)
    if metric is None:
        return f"  {task}: no metrics ({seconds:.1f}s)"
    se = metrics.get(f"{task}/{metric}_stderr")
    value = f"{metrics[f'{task}/{metric}']:.4f}" + (f" ± {se:.4f}" if se is not None else "")
    return f"  {task}: {metric} {value} ({seconds:.1f}s)"


def _run_tasks(run: _Evaluation, model, tokenizer, metrics: dict[str, float],
               seconds: dict[str, float]) -> dict[str, Any]:
    """lm-eval tasks on `model` (the harness is prepared on first use); adds their metrics and time
    to `metrics` and `seconds`, returns lm-eval's output (merged over the tasks)."""
    cfg, ev = run.cfg, run.cfg.eval
    if run.harness is None:
        run.harness = prepare_harness(
            run.tasks, task_data=ev.task_data, work_dir=cfg.experiment_dir / "eval_tasks",
            data_dir=cfg.data_dir, tokenizer=tokenizer, synthetic_docs=ev.synthetic_docs,
            max_tokens=model.config.n_positions, seed=ev.task_seed,  # the same documents for every seed
        )
    t1 = time.time()
    lm = make_lm(model, tokenizer, ev.harness_batch_size, run.autocast)
    on_task = (lambda task, m, s: print(_task_line(task, m, s), flush=True)) if run.progress else None
    task_metrics, raw = run.harness.run(lm, limit=ev.limit, on_task=on_task, bars=run.bars)
    metrics.update(task_metrics)
    seconds["harness"] = time.time() - t1
    seconds.update({f"harness/{task}": s for task, s in raw["task_seconds"].items()})
    return raw
