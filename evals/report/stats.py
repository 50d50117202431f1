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


PAPER_EFFECT_69M = 0.024  # nats: the paper's CoCoMix-vs-NTP gain at 69M (25.3 -> 24.7 ppl, one seed)


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level `alpha` with `n` pairs whose differences have
    standard deviation `sd`, against a true mean difference `effect`: P(|T| > t_crit) with T
    noncentral t (n - 1 degrees of freedom, noncentrality effect * sqrt(n) / sd)."""
    from scipy import integrate
    from scipy.stats import chi2, norm, t  # lazy: scipy only when a table states its power

    df, nc = n - 1, effect * math.sqrt(n) / sd
    crit = float(t.ppf(1 - alpha / 2, df))

    def reject(v: float) -> float:  # P(|Z + nc| > crit * sqrt(V / df) | V = v), Z standard normal
        s = crit * math.sqrt(v / df)
        return float(norm.sf(s - nc) + norm.cdf(-s - nc))

    # Integrated over V ~ chi2(df), over all but 2e-13 of its mass (scipy's nct.cdf returns NaN in the
    # far tails, e.g. df 1, nc 11)
    lo, hi = float(chi2.ppf(1e-13, df)), float(chi2.isf(1e-13, df))
    return float(integrate.quad(lambda v: reject(v) * chi2.pdf(v, df), lo, hi, epsabs=1e-10, limit=200,
                                points=[df])[0])


def mde80(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The minimum detectable effect: the smallest true mean difference the paired t-test over `n`
    pairs (differences' standard deviation `sd`) finds at `alpha` with probability `power`. None
    with fewer than 2 pairs or no spread."""
    if n < 2 or not sd > 0:
        return None
    from scipy.optimize import brentq  # lazy: as above

    hi = sd
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda e: paired_power(e, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def pairs_needed(sd: float, effect: float = PAPER_EFFECT_69M, power: float = 0.8, alpha: float = 0.05,
                 most: int = 100_000) -> int | None:
    """How many pairs (seeds) with differences of standard deviation `sd` the paired t-test needs to
    find `effect` with probability `power`; None past `most` or without spread."""
    if not sd > 0:
        return None
    lo, hi = 2, 2
    while paired_power(effect, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > most:
            return None
    while lo < hi:  # the smallest n in [lo, hi] with enough power (power grows with n)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if paired_power(effect, sd, mid, alpha) < power else (lo, mid)
    return lo
