"""The seed-variance table: how much of the spread over seeds comes from the initial weights and how much
from the data order, where `dag.data_seeds` crosses the seeds (init) with data-order seeds.

For a method's grid of final held-out losses y_ij (init seed i of I, data seed j of J), the two-way
analysis of variance without replication, y_ij = mu + a_i + b_j + e_ij, gives

    MS_init = J sum_i (ybar_i. - ybar)^2 / (I - 1)      MS_data = I sum_j (ybar_.j - ybar)^2 / (J - 1)
    MS_res  = sum_ij (y_ij - ybar_i. - ybar_.j + ybar)^2 / ((I - 1)(J - 1))

and the variance components sd_init^2 = max(0, (MS_init - MS_res) / J), sd_data^2 = max(0, (MS_data -
MS_res) / I), sd_res^2 = MS_res (the interaction of the two, and noise). With one axis only (one data seed,
or one init seed) the spread is that axis's alone: the sample standard deviation over it. The same split
is made for the paired differences to NTP (same init seed and data order), whose spread sets the power
of every comparison.
"""

from __future__ import annotations

import math

import numpy as np

from .runs import Run, group, label_order, paired
from .writers import MISSING, Cell, Table, tex_escape


def variance_components(grid: np.ndarray) -> dict[str, float | None]:
    """{"total", "init", "data", "residual"} standard deviations of an (I init, J data) grid; an axis of
    one seed gives None for the other and for the residual."""
    grid = np.asarray(grid, dtype=float)
    n_i, n_j = grid.shape
    total = float(grid.std(ddof=1)) if grid.size > 1 else None
    if n_i == 1 or n_j == 1:
        sd = total
        return {"total": total, "init": sd if n_j == 1 else None, "data": sd if n_i == 1 else None, "residual": None}
    g, rows, cols = grid.mean(), grid.mean(axis=1), grid.mean(axis=0)
    ms_init = n_j * ((rows - g) ** 2).sum() / (n_i - 1)
    ms_data = n_i * ((cols - g) ** 2).sum() / (n_j - 1)
    ms_res = ((grid - rows[:, None] - cols[None, :] + g) ** 2).sum() / ((n_i - 1) * (n_j - 1))
    return {"total": total, "init": math.sqrt(max(0.0, (ms_init - ms_res) / n_j)),
            "data": math.sqrt(max(0.0, (ms_data - ms_res) / n_i)), "residual": math.sqrt(ms_res)}


def _grid(values: dict[tuple[int, int | None], float]) -> np.ndarray | None:
    """The complete (init seed x data seed) grid of `values`, or None when a cell is missing."""
    inits = sorted({k[0] for k in values})
    datas = sorted({k[1] for k in values}, key=lambda d: -1 if d is None else d)
    if any((i, d) not in values for i in inits for d in datas):
        return None
    return np.array([[values[(i, d)] for d in datas] for i in inits])


def seed_variance_table(runs: list[Run]) -> Table:
    header = ["scale", "method", "quantity", "init seeds", "data seeds", "sd", "sd init", "sd data order", "sd residual"]
    rows = []
    groups = group([r for r in runs if r.ablation is None])
    split = any(r.data_seed is not None for r in runs)
    for (scale, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], label_order([l for _, l in groups]).index(kv[0][1]))):
        quantities = [("held-out loss", {r.pair_key: r.final["val/loss"] for r in rs})]
        ntp = groups.get((scale, "ntp"))
        if label != "ntp" and ntp:
            quantities.append(("Δ vs NTP", {r.pair_key: r.final["val/loss"] - ref.final["val/loss"] for r, ref in paired(rs, ntp)}))
        for name, values in quantities:
            grid = _grid(values) if len(values) > 1 else None
            if grid is None:
                continue
            sd = variance_components(grid)
            if not split:  # each seed set both: the spread cannot be told apart
                sd = {"total": sd["total"], "init": None, "data": None, "residual": None}
            rows.append([scale, label, name, str(grid.shape[0]), str(grid.shape[1]) if split else "(the seed's)"]
                        + [Cell(sd[k], digits=4) if sd[k] is not None else MISSING for k in ("total", "init", "data", "residual")])
    note = ("sd: standard deviation (nats) over the runs; sd init, sd data order, sd residual: the variance components "
            "of the two-way analysis without replication over the grid of init seeds x data seeds "
            "(evals/report/seeds.py); with one data seed the spread is the init's alone, with one init seed the data "
            "order's. Δ vs NTP pairs runs with the same init seed and data order.")
    if not split:
        note += (" This experiment has no data seeds (dag.data_seeds): each seed sets both the initial weights and the "
                 "data order, so sd cannot be split.")
    return Table(header, rows, {}, [note], [tex_escape(note)])
