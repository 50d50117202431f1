"""Curve aggregation (what the plots draw; tested as numbers): held-out loss and its difference to NTP
over seeds, average accuracy against tokens and each task's final accuracy with their standard errors,
and chance levels."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .runs import CHANCE, Run, paired, run_downstream
from .stats import combined_se, mean_std, t95


@dataclass
class Band:
    """A curve over seeds: at each x (eval points every seed has), the mean and a band mean -/+ half."""

    x: list[float]
    mean: list[float]
    half: list[float]  # 0 with one seed
    n: int  # seeds

    @property
    def lo(self) -> list[float]:
        return [m - h for m, h in zip(self.mean, self.half)]

    @property
    def hi(self) -> list[float]:
        return [m + h for m, h in zip(self.mean, self.half)]


def seed_band(curves: list[list[tuple[float, float]]], band: str = "std") -> Band | None:
    """Mean over seeds at the x values every curve has, with band "std" (+-1 sample standard
    deviation over seeds) or "t95" (+- half-width of the 95% t-interval of the mean)."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    if not common:
        return None
    n = len(curves)
    values = [dict(c) for c in curves]
    mean, half = [], []
    for x in common:
        m, std = mean_std([v[x] for v in values])
        mean.append(m)
        if std is None:
            half.append(0.0)
        else:
            half.append(std if band == "std" else t95(n - 1) * std / math.sqrt(n))
    return Band([float(x) for x in common], mean, half, n)


def delta_curves(runs: list[Run], refs: list[Run]) -> list[list[tuple[int, float]]]:
    """Per seed both have: the run's held-out loss minus the reference's at their common eval points."""
    out = []
    for r, ref in paired(runs, refs):
        ref_at = dict(ref.curve)
        out.append([(x, y - ref_at[x]) for x, y in r.curve if x in ref_at])
    return out


@dataclass
class ErrorCurve:
    """Mean over seeds at common x, +-1 combined standard error (`combined_se`)."""

    x: list[float]
    mean: list[float]
    se: list[float | None]
    n: int


def downstream_curve(runs: list[Run]) -> ErrorCurve | None:
    """Average accuracy against tokens: mean over seeds at the checkpoints every seed has, +- the
    combined SE (seed spread and each run's lm-eval SE of its average)."""
    curves = [{t: (v, se) for t, v, se in r.downstream_curve} for r in runs if r.downstream_curve]
    if not curves or len(curves) < len(runs):
        return None
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        return None
    x, mean, se = [], [], []
    for t in common:
        m, s, _ = combined_se([c[t][0] for c in curves], [c[t][1] for c in curves])
        x.append(float(t))
        mean.append(m)
        se.append(s)
    return ErrorCurve(x, mean, se, len(curves))


def final_task_scores(runs: list[Run], keys: list[str]) -> dict[str, tuple[float, float | None]]:
    """Per accuracy key every seed has at its last checkpoint: (mean over seeds, combined SE)."""
    out = {}
    for key in keys:
        per_run = [run_downstream(r, key) for r in runs]
        if per_run and all(p is not None for p in per_run):
            m, s, _ = combined_se([v for v, _ in per_run], [se for _, se in per_run])
            out[key] = (m, s)
    return out


def average_chance(keys: list[str]) -> float | None:
    """Chance level of an average over these tasks (None when a task's chance is not known)."""
    if not keys or any(k not in CHANCE for k in keys):
        return None
    return sum(CHANCE[k] for k in keys) / len(keys)
