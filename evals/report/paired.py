"""Downstream differences against NTP paired over documents and seeds.

Every method is scored on the same documents (`eval.task_seed`), so a method's accuracy difference
to NTP is a paired comparison: per document d and seed s, x_ds = score(method) - score(NTP) in
{-1, 0, 1} (the final checkpoints' per-document scores, lm_eval_samples.json.gz beside eval.json).
The table gives, per scale, method and task metric (acc; acc_norm where the task has it):

- Δ acc: the mean of x over documents and seeds, in percentage points, with a 95% paired bootstrap
  interval: BOOTSTRAP_RESAMPLES resamples of the documents (each keeps all its seeds), seed
  BOOTSTRAP_SEED, percentile interval;
- b / c: the discordant (document, seed) pairs, method right and NTP wrong / the reverse, and the
  exact McNemar p-value, the two-sided binomial test of b against b + c at 1/2 (pooled over seeds,
  whose pairs are not independent of each other: read it as a summary, the interval as the test).
"""

from __future__ import annotations

import numpy as np

from .runs import Run, group, paired, read_samples
from .writers import Cell, Table, tex_escape

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
METRICS = ("acc", "acc_norm")


def run_samples(run: Run, cache: dict[str, dict | None] | None = None) -> dict | None:
    """The run's final per-document scores, read once per `cache`."""
    if cache is not None and run.name in cache:
        return cache[run.name]
    got = read_samples(*run.final_eval) if run.final_eval else None
    if cache is not None:
        cache[run.name] = got
    return got


def paired_scores(runs: list[Run], refs: list[Run], task: str, metric: str,
                  cache: dict[str, dict | None] | None = None) -> np.ndarray | None:
    """(documents, seeds) array of method minus reference scores over the documents every pair has;
    None when a pair lacks the task's per-document scores."""
    columns = []
    common: set[int] | None = None
    per_pair = []
    for run, ref in paired(runs, refs):
        got = [run_samples(r, cache) for r in (run, ref)]
        if any(g is None or task not in g or metric not in g[task] for g in got):
            return None
        maps = [dict(zip(g[task]["doc_id"], g[task][metric])) for g in got]
        per_pair.append(maps)
        ids = set(maps[0]) & set(maps[1])
        common = ids if common is None else common & ids
    if not per_pair or not common:
        return None
    docs = sorted(common)
    for m, r in per_pair:
        columns.append([m[d] - r[d] for d in docs])
    return np.array(columns, dtype=float).T


def bootstrap_ci(x: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean of `x` (documents, seeds), resampling documents."""
    rng = np.random.default_rng(seed)
    per_doc = x.mean(axis=1)
    idx = rng.integers(0, len(per_doc), size=(resamples, len(per_doc)))
    means = per_doc[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of b successes in b + c trials at 1/2."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest  # lazy: scipy only when a table has a test to show

    return float(binomtest(b, b + c, 0.5).pvalue)


def paired_downstream_table(runs: list[Run]) -> Table:
    header = ["scale", "method", "task", "docs", "seeds", "Δ acc vs NTP (pp)", "b (method only)", "c (NTP only)",
              "McNemar p"]
    rows = []
    groups = group([r for r in runs if r.ablation is None])
    cache: dict[str, dict | None] = {}  # each run's samples file read once
    for (scale, label), rs in sorted(groups.items()):
        ntp = groups.get((scale, "ntp"))
        if label == "ntp" or not ntp:
            continue
        tasks = sorted({t for r in rs for t in (run_samples(r, cache) or {})})
        for task in tasks:
            for metric in METRICS:
                x = paired_scores(rs, ntp, task, metric, cache)
                if x is None:
                    continue
                lo, hi = bootstrap_ci(x)
                mean = float(x.mean())
                b, c = int((x > 0).sum()), int((x < 0).sum())
                rows.append([scale, label, f"{task}/{metric}", str(x.shape[0]), str(x.shape[1]),
                             Cell(100 * mean, 100 * max(mean - lo, hi - mean), digits=1, signed=True),
                             str(b), str(c), Cell(mcnemar_exact(b, c), digits=3)])
    notes = [f"Δ acc: method minus NTP per document and seed (same documents, seeds paired), mean in percentage "
             f"points ± the larger half of its 95% paired bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of "
             f"the documents, seed {BOOTSTRAP_SEED}, percentile). b, c: discordant (document, seed) pairs; McNemar "
             "p: exact two-sided binomial test of b in b + c at 1/2, pooled over seeds."]
    return Table(header, rows, {"Δ acc vs NTP (pp)": "ci95"}, notes, [tex_escape(n) for n in notes], md_only=())
