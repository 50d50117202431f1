"""The numbers behind the tables' and plots' +-: mean and sample standard deviation, the 95% t-interval,
the combined standard error of lm-eval scores over seeds, and the tokens a curve needs to reach a loss."""

from __future__ import annotations

import math


def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom (scipy.stats; a hand table
    used to round 11-29 down to the entry below and everything from 30 on to 1.96)."""
    from scipy.stats import t  # lazy: scipy only when a table has an interval to show

    return float(t.ppf(0.975, df))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_ci95(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None with one seed)."""
    mean, std = mean_std(values)
    if std is None:
        return mean, None
    return mean, t95(len(values) - 1) * std / math.sqrt(len(values))


def combined_se(values: list[float], stderrs: list[float | None]) -> tuple[float, float | None, bool]:
    """(mean over seeds, its standard error, complete) with SE = sqrt(s^2/n + mean_i SE_i^2): the
    seeds' spread (s^2 the sample variance, 0 for one seed) plus lm-eval's per-run standard errors
    SE_i, not divided by n because every seed is scored on the same documents. Without every SE_i
    the seed term alone (complete False); None with one seed and no SE_1."""
    n = len(values)
    mean, std = mean_std(values)
    seed_var = 0.0 if std is None else std**2 / n
    if all(se is not None for se in stderrs):
        return mean, math.sqrt(seed_var + sum(se**2 for se in stderrs) / n), True
    return mean, (math.sqrt(seed_var) if n >= 2 else None), False


def average_with_se(metrics: dict[str, float], keys: list[str], extra: list[float] = ()) -> tuple[float, float | None]:
    """The mean of `metrics[k]` over `keys` (and the `extra` values, which carry no standard error)
    and its standard error sqrt(sum_k SE_k^2) / K (the tasks' documents are independent); None when a
    component's `<key>_stderr` is missing."""
    values = [metrics[k] for k in keys] + list(extra)
    ses = [metrics.get(f"{k}_stderr") for k in keys]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s**2 for s in ses)) / len(values)
    return sum(values) / len(values), se


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First point where the held-out loss reaches `target`, linearly interpolated between evals."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        prev = (tokens, loss)
    return None
