"""Tables and plots for an experiment: `cocomix report --config ...`.

Reads every planned run's folder (config, metrics.jsonl, final_metrics.json, per-checkpoint
evaluation JSONs) and writes, under `<experiment_dir>/tables/` and `/plots/`:

- main.{md,tex,csv}: per scale and method, held-out perplexity and downstream scores (the layout
  of the paper's Table 1) at each run's last checkpoint;
- sample_efficiency.{md,tex,csv}: tokens each method needs to reach the NTP run's final held-out
  loss (same scale and seed), read off its evaluation curve by linear interpolation, and the
  percentage of tokens saved, as mean and 95% t-interval over seeds; "not reached" is reported;
- ablations.{md,tex,csv}: CoCoMix and each ablation, final held-out loss and the difference to
  CoCoMix and to NTP, paired by seed;
- plots/heldout_loss_<scale>.png: held-out loss against tokens (mean over seeds, band +-1 std over
  seeds), its difference to NTP paired by seed (band: 95% t-interval of the mean difference) and,
  when the runs record their FLOPs per token, the loss against training FLOPs (student + teacher);
- plots/downstream_<scale>.png: average accuracy against tokens and each task's accuracy at the
  last checkpoint, mean over seeds with error bars of +-1 combined standard error (below), and
  chance accuracy (1 / number of choices; for the average, the average chance of its tasks).

The +- of the tables:

- downstream columns (main): the standard error of the mean over the n seeds, combining the spread
  over seeds with lm-eval's own standard error of each run (the `<task>/<metric>_stderr` of
  eval.json: binomial for accuracies, bootstrap over documents for perplexities):

      SE = sqrt( s^2 / n  +  mean_i SE_i^2 )

  s^2 the sample variance over seeds (0 with one seed, when SE is lm-eval's SE_1). Every seed is
  scored on the same documents, so their document-sampling errors are shared, not independent:
  that part is not divided by n (a second seed does not halve the test set's noise). Averages
  (avg acc, avg ppl) take SE_i = sqrt(sum_k SE_ik^2) / K over their K components (independent
  document sets); the held-out perplexity inside avg ppl carries none. A run without recorded
  stderrs (an eval.json from before they were kept) gives the seed term only, marked with a dagger;
- held-out ppl (main) and held-out loss (ablations): +- one standard deviation over seeds;
- sample efficiency and the ablations' differences: +- half-width of the 95% t-interval over seeds
  (scipy.stats quantiles, `t95`); differences are paired by seed (variant minus reference run of
  the same seed and scale).

Every Markdown and CSV row lists the MLflow run ids it aggregates, so any cell can be traced to its
runs; the LaTeX tables leave them out (they do not fit a page) and escape or typeset everything
else (pure ASCII; `\\usepackage{booktabs,graphicx}`; a table wider than the line is scaled to it).
CSV cells are plain numbers, each +- in its own `<column>_se`, `_std` or `_ci95` column.

The package, one job per file:

- `runs.py`: the runs as the report reads them (run folders, eval JSONs, the teacher's and the SAE's
  records), grouped by scale and method and paired by seed;
- `stats.py`: the numbers behind every +- (standard deviation, 95% t-interval, combined SE);
- `curves.py`: what the plots draw, aggregated over seeds (tested as numbers);
- `tables.py`: the tables and their notes; `writers.py`: the cells and the Markdown, LaTeX and CSV files;
- `plots.py`: the plots (matplotlib, imported only when they are drawn);
- here: `report()`, which writes them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cocomix.config import load_config
from cocomix.plan import teacher_spec
from cocomix.files import clear_stale_tmp
from cocomix.tracking import open_tracker, runs_heading

from .curves import average_chance, delta_curves, downstream_curve, final_task_scores, seed_band
from .compute import compute_table
from .paired import paired_downstream_table
from .plots import plot_curves
from .seeds import seed_variance_table
from .tuning import tuning_line, tuning_results, tuning_table
from .runs import CHANCE, Run, diagnostic_curves, group, load_eval_jsons, load_runs, read_json
from .stats import t95, tokens_to_reach
from .tables import (DAGGER, ablation_table, diagnostics_table, main_table, sae_table, sample_efficiency_table,
                     teacher_table)
from .writers import write_table

__all__ = [
    "CHANCE",
    "DAGGER",
    "Run",
    "average_chance",
    "delta_curves",
    "diagnostic_curves",
    "downstream_curve",
    "final_task_scores",
    "group",
    "load_eval_jsons",
    "load_runs",
    "main_table",
    "report",
    "seed_band",
    "t95",
    "tokens_to_reach",
]


def report(config_path: str | Path) -> Path:
    cfg = load_config(config_path)
    runs = load_runs(config_path)
    spec = teacher_spec(config_path)  # the DAG's own teacher run (none when teacher.path is given)
    teacher = read_json(spec.config(config_path).run_dir / "final_metrics.json") if spec else None
    tables = cfg.experiment_dir / "tables"
    for folder in (tables, cfg.experiment_dir / "plots"):
        clear_stale_tmp(folder)  # what a killed report left
    exp = cfg.experiment
    all_runs, runs = runs, [r for r in runs if r.arm is None]  # compute-matched arms: main and compute tables only
    tuned = tuning_results(cfg)
    for name, table, caption in (
        ("main", main_table(all_runs, tuning_line(cfg, tuned)), f"{exp}: held-out perplexity and downstream scores, mean over seeds ± standard "
                                   "error (note below)"),
        ("sample_efficiency", sample_efficiency_table(runs),
         f"{exp}: tokens to reach the NTP run's final held-out loss (same scale and seed), mean ± 95% t-interval "
         "over seeds"),
        ("ablations", ablation_table(runs),
         f"{exp}: final held-out loss of CoCoMix and its ablations, mean ± std over seeds; differences paired by seed"),
        ("diagnostics", diagnostics_table(runs),
         f"{exp}: what the read-out slot does (pause, CoCoMix and its ablations), final in-training evaluation, "
         "mean ± std over seeds"),
        ("teacher", teacher_table(runs, teacher),
         f"{exp}: the teacher against the students, final held-out loss"),
        ("sae", sae_table(read_json(cfg.experiment_dir / "sae" / "metrics.json"), cfg),
         f"{exp}: the TopK SAE on the teacher's residual stream, reconstruction and concept recovery"),
        ("compute", compute_table(all_runs),
         f"{exp}: training FLOPs per run, student and teacher side apart, mean over seeds"),
        ("paired_downstream", paired_downstream_table(runs),
         f"{exp}: downstream accuracy differences to NTP paired over documents and seeds, final checkpoints"),
        ("tuning", tuning_table(cfg, tuned), f"{exp}: equal tuning of every method, on the tuning split"),
        ("seed_variance", seed_variance_table(runs),
         f"{exp}: the spread over seeds, split into initial weights and data order, final held-out loss"),
    ):
        if runs_heading(cfg):  # the run ids are another tracker's than MLflow's
            table.name_runs(runs_heading(cfg))
        write_table(tables, name, table, caption=caption)
    plots = plot_curves(runs, cfg.experiment_dir / "plots")
    attach(cfg, sorted(tables.glob("*.csv")) + sorted(tables.glob("*.md")) + plots)
    return cfg.experiment_dir


def attach(cfg, files: list[Path]) -> None:
    """The tables and plots as the artifacts of one tracked run per experiment, `report` (tag role=report;
    its folder <experiment>/report/ keeps its id, so a later report continues it)."""
    folder = cfg.experiment_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(dataclasses.replace(cfg, run_name="report"), folder,
                           {"experiment": cfg.experiment, "method": "report", "role": "report"}, source="cocomix report")
    for f in files:
        tracker.log_artifact(f)
    tracker.finish("FINISHED")
