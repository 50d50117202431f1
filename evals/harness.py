"""lm-evaluation-harness on an in-memory checkpoint, through its Python API (spec section 5:
`simple_evaluate` via the `hf` wrapper, zero-shot).

    harness = prepare_harness(["paper", "synthetic"], task_data=..., work_dir=..., data_dir=..., ...)
    metrics, raw = harness.run(make_lm(model, tokenizer, batch_size=64), limit=None)

`prepare_harness` is done once per `cocomix eval` call (task conversion, YAMLs, task index) and
reused for every checkpoint. Task names: lm-eval's own (`hellaswag`, ...), our synthetic tasks
(`synth_topic`, `synth_recall`), and the aliases `paper` (the seven) and `synthetic`.

`metrics` holds every numeric value lm-eval reports for the unfiltered results, `<task>/<metric>`,
with its standard error as `<task>/<metric>_stderr` (lm-eval's: binomial for accuracies, bootstrap
for perplexities). lm-eval gives none ("N/A") for weighted perplexities (WikiText's word and byte
perplexity, bits per byte); those are bootstrapped here over documents (`raw["cocomix_stderrs"]`
names them). Tasks run one `simple_evaluate` call each, so each can report when it is done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cocomix.config import ConfigError

from .offline_tasks import LM_EVAL_TASK_FOLDERS, OFFLINE_SUFFIX, PAPER_METRICS, PAPER_TASKS, prepare_offline_tasks
from .synthetic_tasks import SYNTHETIC_TASKS, prepare_synthetic_tasks

ALIASES = {"paper": PAPER_TASKS, "synthetic": SYNTHETIC_TASKS}
logger = logging.getLogger("cocomix.evals")


def expand_tasks(names: list[str]) -> list[str]:
    """Aliases -> task names, order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for task in ALIASES.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


class _DropTruncationWarnings(logging.Filter):
    """lm-eval warns once per request whose context is cut to the model's length; at tiny context
    lengths that is every request. We count them ourselves and report one line per task set. It
    also warns, once per `simple_evaluate` call (one per task here), about what we do on purpose:
    passing a loaded model, and zero-shot over each task's default."""

    EXPECTED = ("Combined length of context", "`pretrained` model kwarg is not of type",
                "Passed an already-initialized model", "Overwriting default num_fewshot")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.EXPECTED)


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int | str = 64, mixed_precision: torch.dtype | None = None):
    """lm-eval's HFLM around a loaded model (no second load from disk). A padded vocabulary needs nothing
    here: padding ids have -inf logits, so lm-eval's log-softmax and greedy checks are the unpadded model's."""
    from lm_eval.models.huggingface import HFLM

    class CocomixLM(HFLM):
        """HFLM that can score continuations longer than the model's context.

        lm-eval asserts len(continuation) <= max_length. With the paper's 1024-token models this never
        happens; with tiny models (64-128 positions) long HellaSwag/PIQA endings do. Such a
        continuation is scored on its last `max_length` tokens, its earlier tokens becoming context;
        `clipped` counts how often (reported in the results).
        """

        clipped = 0

        def _model_call(self, inps, attn_mask=None, labels=None):
            """Logits only: HFLM calls `model(inps)`, and in eval mode `use_cache` defaults on, so every
            scoring forward built a KV cache it never read (about 23 GB at 1.38B by estimate)."""
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(input_ids=inps, use_cache=False).logits

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            n, fixed = self.max_length, []
            for key, context_enc, continuation_enc in requests:
                if len(continuation_enc) > n:
                    context_enc, continuation_enc = context_enc + continuation_enc[:-n], continuation_enc[-n:]
                    self.clipped += 1
                fixed.append((key, context_enc, continuation_enc))
            return super()._loglikelihood_tokens(fixed, disable_tqdm=disable_tqdm, override_bs=override_bs)

    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTruncationWarnings) for f in log.filters):  # once, not per checkpoint
            log.addFilter(_DropTruncationWarnings())
    device = next(model.parameters()).device
    return CocomixLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",  # our architecture is not in transformers' CausalLM name table
        batch_size=batch_size,
        max_batch_size=512,
        device=str(device),
        max_length=model.config.n_positions,
        mixed_precision_dtype=mixed_precision,
    )


@dataclass
class Harness:
    tasks: list[str]  # task names as the results report them
    lm_eval_names: list[str]  # what simple_evaluate is asked for (offline groups where local)
    task_manager: Any

    def run(self, lm, limit: int | None = None, log_samples: bool = False,
            on_task: Callable[[str, dict[str, float], float], None] | None = None,
            bars: bool = False) -> tuple[dict[str, float], dict]:
        """Evaluate every task, one `simple_evaluate` call each; return ({"<task>/<metric>": value,
        "<task>/<metric>_stderr": its standard error}, lm-eval's output merged over the tasks).

        on_task(task, its metrics, seconds) is called as each task finishes; bars: lm-eval's own
        progress bars (off: they fill logs that are not a terminal)."""
        import lm_eval

        lm.clipped = 0
        metrics: dict[str, float] = {}
        merged: dict[str, Any] = {"results": {}, "versions": {}, "n-shot": {}, "n-samples": {}, "configs": {},
                                  "higher_is_better": {}, "group_subtasks": {}, "samples": {},
                                  "task_seconds": {}, "cocomix_stderrs": [], "per_doc": {}}
        for task, name in zip(self.tasks, self.lm_eval_names):
            t0 = time.time()
            with lm_eval_bars(bars):
                raw = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[name],
                    task_manager=self.task_manager,
                    num_fewshot=0,  # the paper's protocol is zero-shot
                    limit=limit,
                    log_samples=True,  # per-document values: the weighted perplexities' stderrs (below)
                    bootstrap_iters=1000,  # stderr of the perplexities; the paper reports none
                    verbosity="WARNING",
                )
            results = raw["results"].get(task, {})
            samples = raw.get("samples", {}).get(task, [])
            task_metrics: dict[str, float] = {}
            for key, value in results.items():
                metric, _, filt = key.partition(",")
                if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    task_metrics[f"{task}/{metric}"] = float(value)  # "N/A" stderrs are skipped
            for metric, aggregate in WEIGHTED_AGGREGATES.items():
                key = f"{task}/{metric}"
                if key in task_metrics and key + "_stderr" not in task_metrics:
                    se = bootstrap_weighted_stderr([s[metric] for s in samples if metric in s], aggregate)
                    if se is not None:
                        task_metrics[key + "_stderr"] = se
                        merged["cocomix_stderrs"].append(key + "_stderr")
            merged["per_doc"][task] = per_document(samples)
            seconds = time.time() - t0
            metrics.update(task_metrics)
            for part in ("results", "versions", "n-shot", "n-samples", "configs", "higher_is_better",
                         "group_subtasks"):
                merged[part].update(raw.get(part, {}))
            if log_samples:
                merged["samples"].update(raw.get("samples", {}))
            merged["config"] = raw.get("config", {})
            merged["lm_eval_version"] = raw.get("lm_eval_version")
            merged["task_seconds"][task] = seconds
            if on_task is not None:
                on_task(task, task_metrics, seconds)
        if not log_samples:
            del merged["samples"]
        merged["clipped_continuations"] = lm.clipped
        return metrics, merged


def per_document(samples: list[dict]) -> dict[str, list]:
    """A task's per-document scores from lm-eval's samples, compactly: `doc_id` and, for every metric
    whose per-document value is a number (acc, acc_norm: 0 or 1), its values in the same order. What
    the report's paired tests read (the same documents for every run: `eval.task_seed`)."""
    samples = sorted(samples, key=lambda x: x["doc_id"])
    out: dict[str, list] = {"doc_id": [int(x["doc_id"]) for x in samples]}
    for metric in (samples[0] if samples else {}):
        values = [x.get(metric) for x in samples]
        if metric != "doc_id" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[metric] = [float(v) for v in values]
    return out


# Aggregations lm-eval gives no standard error for (weighted perplexities): per-document values are
# (log-likelihood, weight) pairs, the aggregate a function of their sums.
WEIGHTED_AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "word_perplexity": lambda ll, w: np.exp(-ll / w),
    "byte_perplexity": lambda ll, w: np.exp(-ll / w),
    "bits_per_byte": lambda ll, w: -ll / w / math.log(2),
}


def bootstrap_weighted_stderr(pairs: list, aggregate, iters: int = 1000, seed: int = 1234) -> float | None:
    """Standard error of `aggregate(sum ll, sum weight)` over documents, by bootstrap (documents
    resampled with replacement, `iters` times, fixed seed: the same record on every rerun). None
    with fewer than two documents."""
    if len(pairs) < 2:
        return None
    ll, w = np.asarray([p[0] for p in pairs], dtype=np.float64), np.asarray([p[1] for p in pairs], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(ll), size=(iters, len(ll)))  # (iters, docs)
    with np.errstate(over="ignore"):
        values = aggregate(ll[idx].sum(axis=1), w[idx].sum(axis=1))
    return float(np.std(values, ddof=1))


LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def lm_eval_bars(enabled: bool):
    """lm-eval draws a tqdm bar per task build, per request type and per bootstrap, with no switch
    for all of them; off, they are swapped for a disabled tqdm while the block runs."""
    if enabled:
        yield
        return
    import importlib

    import tqdm as tqdm_module

    original = tqdm_module.tqdm

    class _Off(original):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = [(tqdm_module, "tqdm", original)]  # lm_eval.api.metrics imports it inside functions
    for name in LM_EVAL_BAR_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is original:
            patched.append((module, "tqdm", original))
    try:
        for module, attr, _ in patched:
            setattr(module, attr, _Off)
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def prepare_harness(
    tasks: list[str],
    *,
    task_data: str | Path | None,
    work_dir: str | Path,
    data_dir: str | Path | None = None,
    tokenizer=None,
    synthetic_docs: int = 500,
    max_tokens: int = 1024,
    seed: int = 0,
) -> Harness:
    """Write whatever the tasks need under `work_dir` and index only the task folders used.

    task_data: folder with local copies of the paper's benchmarks (offline), or None to let
    lm-eval load them from the Hugging Face Hub as usual.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    names = expand_tasks(tasks)
    work_dir = Path(work_dir)
    include = []
    lm_eval_names = []
    synthetic = [t for t in names if t in SYNTHETIC_TASKS]
    if synthetic:
        if data_dir is None or tokenizer is None:
            raise ConfigError("eval.tasks: synthetic tasks need the run's data folder and tokenizer")
        synth_dir = work_dir / "synthetic" / f"n{synthetic_docs}-ctx{max_tokens}-seed{seed}"
        prepare_synthetic_tasks(data_dir, synth_dir, tokenizer, synthetic_docs, max_tokens, seed)
        include.append(str(synth_dir))
    local = [t for t in names if t in PAPER_TASKS and task_data is not None]
    if local:
        offline_dir = work_dir / "offline"
        prepare_offline_tasks(task_data, offline_dir, local)
        include.append(str(offline_dir))
    builtin_dir = Path(lm_eval.tasks.__file__).parent
    for t in names:
        if t in SYNTHETIC_TASKS:
            lm_eval_names.append(t)
        elif t in local:
            lm_eval_names.append(t + OFFLINE_SUFFIX)
        else:
            lm_eval_names.append(t)
    # Index only the built-in folders we need (~0.02 s instead of ~10 s for all of lm-eval's tasks);
    # any other task name falls back to the full index.
    others = [t for t in names if t not in SYNTHETIC_TASKS]
    known = all(t in LM_EVAL_TASK_FOLDERS for t in others)
    if known:
        include += sorted({str(builtin_dir / LM_EVAL_TASK_FOLDERS[t]) for t in others})
    manager = TaskManager(include_defaults=not known, include_path=include or None)
    missing = [n for n in lm_eval_names if n not in manager.all_tasks]
    if missing:
        raise ConfigError(f"eval.tasks: unknown lm-eval task(s) {missing} (aliases: {sorted(ALIASES)})")
    return Harness(tasks=names, lm_eval_names=lm_eval_names, task_manager=manager)


def paper_summary(metrics: dict[str, float], val_ppl: float | None = None) -> dict[str, float]:
    """The paper's averages (spec 4.1, Table 1): Avg Acc over the five accuracy tasks, Avg PPL over
    held-out, LAMBADA and WikiText perplexity; only when every component is present."""
    out = {}
    acc_keys = [f"{t}/{PAPER_METRICS[t][0]}" for t in ("hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande")]
    if all(k in metrics for k in acc_keys):
        out["avg_acc"] = sum(metrics[k] for k in acc_keys) / len(acc_keys)
    ppl_keys = ["lambada_openai/perplexity", "wikitext/word_perplexity"]
    if val_ppl is not None and all(k in metrics for k in ppl_keys):
        out["avg_ppl"] = (val_ppl + sum(metrics[k] for k in ppl_keys)) / 3
    return out


def set_quiet(bars: bool = False) -> None:
    """datasets prints per-split progress bars (always off); transformers draws one per checkpoint
    load (off unless `bars`: our progress lines and lm-eval's bars show progress)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    if not bars:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
