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
"""

from __future__ import annotations

import csv
import io
import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from cocomix.config import load_config
from cocomix.plan import plan_runs, teacher_spec
from cocomix.data import DataError
from cocomix.files import atomic_write_bytes, atomic_write_text, clear_stale_tmp, read_sealed_json
from cocomix.tracking import MetricsLog

# Downstream columns in the paper's Table 1 order: (column, eval-JSON metric key, lower is better).
DOWNSTREAM = [
    ("LAMBADA ppl", "lambada_openai/perplexity", True),
    ("WikiText ppl", "wikitext/word_perplexity", True),
    ("HellaSwag acc_n", "hellaswag/acc_norm", False),
    ("PIQA acc", "piqa/acc", False),
    ("SIQA acc", "social_iqa/acc", False),
    ("ARC-E acc", "arc_easy/acc", False),
    ("WinoG acc", "winogrande/acc", False),
]
ACCURACY_KEYS = [key for _, key, lower in DOWNSTREAM if not lower]
PPL_KEYS = [key for _, key, lower in DOWNSTREAM if lower]

# Chance accuracy of each multiple-choice task: 1 / number of choices (the task definitions:
# lm-eval's YAMLs for the paper's tasks, evals/synthetic_tasks.py for ours).
CHANCE = {
    "hellaswag/acc_norm": 1 / 4,  # 4 endings
    "piqa/acc": 1 / 2,  # 2 solutions
    "social_iqa/acc": 1 / 3,  # 3 answers
    "arc_easy/acc": 0.2502,  # mean of 1/n over the 2376 test questions: 2365 with 4 choices, 7 with 3, 4 with 5
    "winogrande/acc": 1 / 2,  # 2 options
    "synth_topic/acc": 1 / 4,  # 4 choices (synthetic_tasks.topic_docs)
    "synth_recall/acc": 1 / 4,  # 4 choices (synthetic_tasks.recall_docs)
}

DAGGER = "†"  # a +- with the seed term only (no per-run standard error recorded)
# Fixed colours per method (the same in every plot); ablations and others take the next ones.
METHOD_ORDER = ["ntp", "kd", "pause", "cocomix"]


def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom (scipy.stats; a hand table
    used to round 11-29 down to the entry below and everything from 30 on to 1.96)."""
    from scipy.stats import t  # lazy: scipy only when a table has an interval to show

    return float(t.ppf(0.975, df))


@dataclass
class Run:
    name: str
    method: str
    scale: str
    seed: int
    ablation: str | None
    run_dir: Path
    mlflow_run_id: str | None
    final: dict
    curve: list[tuple[int, float]]  # (tokens seen, held-out loss)
    downstream: dict[str, float] = field(default_factory=dict)  # final checkpoint's eval metrics
    # (tokens, average accuracy, its lm-eval standard error or None) per evaluated checkpoint
    downstream_curve: list[tuple[int, float, float | None]] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)  # every in-training evaluation record (val/*)

    @property
    def label(self) -> str:
        return self.ablation or self.method

    @property
    def training_flops_per_token(self) -> float | None:
        """Student plus teacher FLOPs per training token (cocomix/flops.py), when recorded."""
        if "flops_per_token" not in self.final:
            return None
        return float(self.final["flops_per_token"]) + float(self.final.get("teacher_flops_per_token") or 0)


def load_eval_jsons(run_dir: Path) -> list[dict]:
    """Per-checkpoint evaluation results written by `cocomix eval`, sorted by tokens seen."""
    out = []
    for path in sorted(run_dir.glob("checkpoints/*/eval.json")):
        record = read_sealed_json(path)
        if record is None:  # a table silently missing a point would be worse than no table
            raise DataError(f"{path}: damaged (not the record `cocomix eval` wrote); run `cocomix eval {run_dir}` "
                            "again, it re-evaluates that checkpoint")
        out.append(record)
    return sorted(out, key=lambda r: r.get("tokens_seen", 0))


def accuracy_keys(metrics: dict[str, float]) -> list[str]:
    """The accuracies an average accuracy is taken over: the paper's five, else every `<task>/acc`."""
    return [k for k in ACCURACY_KEYS if k in metrics] or sorted(k for k in metrics if k.endswith("/acc"))


def load_runs(config_path: str | Path) -> list[Run]:
    runs = []
    for spec in plan_runs(config_path):
        cfg = spec.config(config_path)
        final_path = cfg.run_dir / "final_metrics.json"
        if not final_path.exists():
            continue
        try:
            final = json.loads(final_path.read_bytes())
        except ValueError:
            raise DataError(f"{final_path}: not valid JSON (damaged); rerun the training, it rewrites it") from None
        history = [rec for rec in MetricsLog(cfg.run_dir / "metrics.jsonl").read() if "val/loss" in rec]
        curve = [(rec["tokens_seen"], rec["val/loss"]) for rec in history]
        run = Run(spec.name, spec.method, spec.scale or "base", spec.seed, spec.ablation, cfg.run_dir,
                  final.get("mlflow_run_id"), final, curve, val_history=history)
        evals = load_eval_jsons(cfg.run_dir)
        for ev in evals:
            m = ev.get("metrics", {})
            keys = accuracy_keys(m)
            if keys:
                run.downstream_curve.append((ev["tokens_seen"], *average_with_se(m, keys)))
        if evals:
            run.downstream = evals[-1].get("metrics", {})
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------


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


def paired(runs: list[Run], refs: list[Run]) -> list[tuple[Run, Run]]:
    """(run, reference run of the same seed) for every seed both have, by seed."""
    by_seed = {r.seed: r for r in refs}
    return [(r, by_seed[r.seed]) for r in sorted(runs, key=lambda r: r.seed) if r.seed in by_seed]


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    """A number with an optional +- (`spread`); `text` replaces both (e.g. "not reached")."""

    mean: float | None
    spread: float | None = None
    digits: int = 2
    signed: bool = False
    mark: str = ""  # e.g. DAGGER
    text: str | None = None

    @property
    def missing(self) -> bool:
        return self.text is None and (self.mean is None or math.isnan(self.mean))

    def number(self, value: float) -> str:
        return f"{value:{'+' if self.signed else ''}.{self.digits}f}"

    def md(self) -> str:
        if self.text is not None:
            return self.text
        if self.missing:
            return "–"
        return self.number(self.mean) + (f" ± {self.spread:.{self.digits}f}" if self.spread is not None else "") + self.mark

    def tex(self) -> str:
        if self.text is not None:
            return tex_escape(self.text)
        if self.missing:
            return "--"
        value = self.number(self.mean) + tex_escape(self.mark)
        if self.spread is None:
            return value
        return tex_stack([value, f"{{\\scriptsize$\\pm${self.spread:.{self.digits}f}}}"], "r")  # +- below: narrower


MISSING = Cell(None)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell | str]]
    spread: dict[str, str] = field(default_factory=dict)  # column -> CSV suffix of its +- ("se", "std", "ci95")
    notes_md: list[str] = field(default_factory=list)  # lines under the Markdown table
    notes_tex: list[str] = field(default_factory=list)  # the same in LaTeX (already escaped)
    md_only: tuple[str, ...] = ("mlflow runs",)  # columns left out of the .tex
    # The .tex as several tabulars one above the other, each these columns (default: one, all)
    tex_panels: list[list[str]] = field(default_factory=list)


TEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\~{}"}
TEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "—": "---", "†": r"$^\dagger$", "×": r"$\times$",
               "≥": r"$\geq$", "≤": r"$\leq$", "−": "$-$", "²": r"$^2$", "·": r"$\cdot$", "σ": r"$\sigma$",
               "Σ": r"$\Sigma$", "√": r"$\surd$", "’": "'", "“": "``", "”": "''"}


def tex_escape(s: str) -> str:
    """Text -> LaTeX that pdflatex compiles with no extra package: specials escaped, known non-ASCII
    characters as math or dashes, any other one reduced to its ASCII letters (accents dropped)."""
    out = []
    for ch in s:
        if ch in TEX_SPECIAL:
            out.append(TEX_SPECIAL[ch])
        elif ch in TEX_UNICODE:
            out.append(TEX_UNICODE[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?")
    return "".join(out)


def tex_stack(lines: list[str], align: str = "c") -> str:
    """Lines (already LaTeX) stacked in one table cell, top line on the row's baseline."""
    if len(lines) == 1:
        return lines[0]
    return f"\\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + r"\\[-1pt]".join(lines) + r"\end{tabular}"


def tex_header(text: str, align: str) -> str:
    """A column name on two lines (split at its last space or slash) to keep number columns narrow."""
    cut = max(text.rfind(" "), text.rfind("/"))
    if cut <= 0 or len(text) <= 8:
        return tex_escape(text)
    return tex_stack([tex_escape(text[:cut]), tex_escape(text[cut + 1:])], align)


def _csv_number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else format(value, ".10g")


def write_table(out_dir: Path, name: str, table: Table, caption: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table.header, table.rows

    def md_cell(c):
        return c.md() if isinstance(c, Cell) else c

    md = [f"<!-- {caption} -->", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    for line in table.notes_md:  # footnotes, each its own paragraph under the table
        md += ["", line]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")

    tex = [r"% cocomix report table; needs \usepackage{booktabs,graphicx}. Wider than the line: scaled to it.",
           r"\begin{table}[t]", r"\centering", f"\\caption{{{tex_escape(caption)}}}", r"\setlength{\tabcolsep}{4pt}"]
    panels = table.tex_panels or [[h for h in header if h not in table.md_only]]
    # Columns with no number in any row stay out of the .tex (e.g. the paper's tasks in a synthetic
    # experiment); a panel left with its key columns only is dropped.
    empty = {h for i, h in enumerate(header) if rows and all(isinstance(r[i], Cell) and r[i].missing for r in rows)}
    panels = [[h for h in panel if h not in empty] for panel in panels]
    panels = [panel for panel in panels if any(h in table.spread for h in panel)] or panels[:1]
    for k, panel in enumerate(panels):
        keep = [header.index(h) for h in panel]
        align = "".join("r" if any(isinstance(r[i], Cell) for r in rows) else "l" for i in keep)  # numbers right
        tex += [r"\sbox0{\begin{tabular}{" + align + "}", r"\toprule",
                " & ".join(tex_header(header[i], a) for i, a in zip(keep, align)) + r" \\", r"\midrule"]
        tex += [" & ".join(r[i].tex() if isinstance(r[i], Cell) else tex_escape(r[i]) for i in keep) + r" \\"
                for r in rows]
        tex += [r"\bottomrule", r"\end{tabular}}%",
                r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi"]
        if k < len(panels) - 1:
            tex += [r"\par\medskip"]
    if table.notes_tex:
        tex += [r"\par\smallskip{\footnotesize\raggedright " + " ".join(table.notes_tex) + r"\par}"]
    tex += [r"\end{table}"]
    atomic_write_text(out_dir / f"{name}.tex", "\n".join(tex) + "\n")

    csv_header: list[str] = []
    for h in header:
        csv_header += [h, f"{h}_{table.spread[h]}"] if h in table.spread else [h]
    csv_rows = []
    for r in rows:
        out = []
        for h, c in zip(header, r):
            if not isinstance(c, Cell):
                out.append(c)
            elif c.text is not None:
                out.append(c.text)
            else:
                out.append(_csv_number(c.mean))
            if h in table.spread:
                out.append(_csv_number(c.spread) if isinstance(c, Cell) and c.text is None else "")
        csv_rows.append(out)
    buf = io.StringIO()
    csv.writer(buf).writerows([csv_header, *csv_rows])
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())


def group(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    out: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        out.setdefault((r.scale, r.label), []).append(r)
    return out


def ids(runs: list[Run]) -> str:
    return " ".join(r.mlflow_run_id or f"(untracked:{r.name})" for r in sorted(runs, key=lambda r: r.seed))


def heldout_ppl(r: Run) -> float:
    """Full-protocol perplexity from `cocomix eval` when present, else the in-training estimate."""
    return r.downstream.get("val_ppl", r.final["val/ppl"])


def extra_accuracy_keys(runs: list[Run]) -> list[str]:
    """Accuracies of tasks beyond the paper's seven (e.g. the synthetic corpus's tasks)."""
    paper = {k for _, k, _ in DOWNSTREAM}
    return sorted({k for r in runs for k in r.downstream if k.endswith("/acc") and k not in paper})


def downstream_cell(per_run: list[tuple[float, float | None] | None], scale_by: float = 1.0) -> Cell:
    """Mean over seeds +- combined SE of per-run (value, lm-eval SE) pairs; "–" when a seed lacks it."""
    if not per_run or any(p is None for p in per_run):
        return MISSING
    mean, se, complete = combined_se([scale_by * v for v, _ in per_run],
                                     [None if s is None else scale_by * s for _, s in per_run])
    return Cell(mean, se, mark="" if complete or se is None else DAGGER)


def run_downstream(r: Run, key: str) -> tuple[float, float | None] | None:
    return (r.downstream[key], r.downstream.get(f"{key}_stderr")) if key in r.downstream else None


def run_avg_ppl(r: Run) -> tuple[float, float | None] | None:
    """(held-out, LAMBADA and WikiText perplexity averaged, SE from the two lm-eval ones)."""
    if not all(k in r.downstream for k in PPL_KEYS):
        return None
    return average_with_se(r.downstream, PPL_KEYS, extra=[heldout_ppl(r)])


def run_avg_acc(r: Run) -> tuple[float, float | None] | None:
    if not all(k in r.downstream for k in ACCURACY_KEYS):
        return None
    return average_with_se(r.downstream, ACCURACY_KEYS)


MAIN_NOTES_MD = [
    f"Downstream ± (accuracies in %): standard error of the mean over the n seeds, SE = sqrt(s²/n + mean_i SE_i²), "
    "s² the variance over seeds (0 for one seed) and SE_i lm-eval's standard error of run i (binomial for "
    "accuracies, bootstrap over documents for perplexities); the seeds share the documents, so that part is "
    "not divided by n. avg acc and avg ppl: SE_i = sqrt(Σ_k SE_ik²)/K over their K components (held-out ppl "
    f"adds none). {DAGGER}: no per-run SE recorded, seed term only.",
    "held-out ppl: mean ± one standard deviation over seeds (none with one seed).",
    "Δ loss vs NTP: final held-out loss (nats) minus the NTP run's of the same seed and scale, mean over seeds ± "
    "half-width of the 95% t-interval (none with one pair).",
]
MAIN_NOTES_TEX = [
    r"Downstream $\pm$ (accuracies in \%): standard error of the mean over the $n$ seeds,"
    r" $\mathrm{SE}=\sqrt{s^2/n+\frac{1}{n}\sum_i \mathrm{SE}_i^2}$, $s^2$ the variance over seeds"
    r" (0 for one seed), $\mathrm{SE}_i$ lm-eval's standard error of run $i$ (binomial for accuracies, bootstrap"
    r" over documents for perplexities); the seeds share the documents, so that part is not divided by $n$."
    r" Avg acc, avg ppl: $\mathrm{SE}_i=\sqrt{\sum_k \mathrm{SE}_{ik}^2}/K$ over their $K$ components (held-out"
    r" ppl adds none). $^\dagger$: no per-run SE recorded, seed term only."
    r" Held-out ppl: mean $\pm$ one standard deviation over seeds. $\Delta$ loss vs NTP: final held-out loss"
    r" (nats) minus the NTP run's of the same seed, mean $\pm$ half-width of the 95\% $t$-interval.",
]
DELTA_NTP = "Δ loss vs NTP"


def main_table(runs: list[Run]) -> Table:
    extra = extra_accuracy_keys(runs)
    header = (["scale", "method", "seeds", "held-out ppl", DELTA_NTP] + [c for c, _, _ in DOWNSTREAM]
              + ["avg ppl", "avg acc"] + extra + ["mlflow runs"])
    rows = []
    main = [r for r in runs if r.ablation is None]
    groups = group(main)
    for (scale, label), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        delta = paired_delta(rs, groups.get((scale, "ntp"))) if label != "ntp" else MISSING
        cells: list[Cell | str] = [scale, label, str(len(rs)), Cell(*mean_std([heldout_ppl(r) for r in rs])), delta]
        for _, key, lower in DOWNSTREAM:
            cells.append(downstream_cell([run_downstream(r, key) for r in rs], 1 if lower else 100))
        cells.append(downstream_cell([run_avg_ppl(r) for r in rs]))
        cells.append(downstream_cell([run_avg_acc(r) for r in rs], 100))
        for key in extra:
            cells.append(downstream_cell([run_downstream(r, key) for r in rs], 100))
        cells.append(ids(rs))
        rows.append(cells)
    spread = {"held-out ppl": "std", DELTA_NTP: "ci95", **{h: "se" for h in header[5:-1]}}
    # LaTeX: perplexities, the paper's accuracies and other tasks' accuracies one above the other, each
    # panel about a line wide (all 15 columns in one row are twice that)
    keys = header[:3]
    ppl = ["held-out ppl", DELTA_NTP] + [c for c, _, lower in DOWNSTREAM if lower] + ["avg ppl"]
    acc = [c for c, _, lower in DOWNSTREAM if not lower] + ["avg acc"]
    return Table(header, rows, spread, MAIN_NOTES_MD, MAIN_NOTES_TEX,
                 tex_panels=[keys + ppl, keys[:2] + acc, keys[:2] + extra])  # seeds: once


def sample_efficiency_table(runs: list[Run]) -> Table:
    header = ["scale", "method", "seeds reaching NTP", "tokens to NTP's final loss", "tokens saved (%)", "mlflow runs"]
    rows = []
    ntp = {(r.scale, r.seed): r for r in runs if r.method == "ntp" and r.ablation is None}
    for (scale, label), rs in group(runs).items():
        if label == "ntp":
            continue
        reached, saved, used = [], [], []
        for r in sorted(rs, key=lambda r: r.seed):
            ref = ntp.get((r.scale, r.seed))
            if ref is None or not ref.curve:
                continue
            used.append(r)
            target_tokens, target_loss = ref.curve[-1]
            t = tokens_to_reach(r.curve, target_loss)
            if t is not None:
                reached.append(t)
                saved.append(100.0 * (1.0 - t / target_tokens))
        if not used:
            continue
        tok = Cell(*mean_ci95(reached), digits=0) if reached else Cell(None, text="not reached")
        sav = Cell(*mean_ci95(saved), digits=1) if reached else MISSING
        rows.append([scale, label, f"{len(reached)}/{len(used)}", tok, sav, ids(used)])
    notes_md = ["± : half-width of the 95% t-interval over the seeds that reached NTP's final loss (none with one seed)."]
    notes_tex = [r"$\pm$: half-width of the 95\% $t$-interval over the seeds that reached NTP's final loss."]
    return Table(header, rows, {"tokens to NTP's final loss": "ci95", "tokens saved (%)": "ci95"}, notes_md, notes_tex)


def paired_delta(runs: list[Run], refs: list[Run] | None) -> Cell:
    """Mean over seeds of (run's final held-out loss - the reference run's of the same seed) +- the
    95% t-interval half-width (two or more pairs); "–" without a common seed."""
    pairs = paired(runs, refs or [])
    if not pairs:
        return MISSING
    return Cell(*mean_ci95([r.final["val/loss"] - ref.final["val/loss"] for r, ref in pairs]), digits=4, signed=True)


def ablation_table(runs: list[Run]) -> Table:
    header = ["scale", "variant", "seeds", "held-out loss", "Δ vs CoCoMix", "Δ vs NTP", "mlflow runs"]
    rows = []
    groups = group(runs)
    for scale in sorted({r.scale for r in runs}):
        ref_c = groups.get((scale, "cocomix"))
        ref_n = groups.get((scale, "ntp"))
        variants = ["cocomix"] + sorted({r.ablation for r in runs if r.ablation and r.scale == scale})
        for v in variants:
            rs = groups.get((scale, v))
            if not rs:
                continue
            loss = Cell(*mean_std([r.final["val/loss"] for r in rs]), digits=4)
            rows.append([scale, v, str(len(rs)), loss, paired_delta(rs, ref_c), paired_delta(rs, ref_n), ids(rs)])
    notes_md = ["held-out loss: final in-training estimate, mean ± one standard deviation over seeds. "
                "Δ: mean over the seeds both have of (variant − reference), paired by seed, ± half-width of "
                "the 95% t-interval (none with one pair)."]
    notes_tex = [r"Held-out loss: final in-training estimate, mean $\pm$ one standard deviation over seeds."
                 r" $\Delta$: mean over the seeds both have of (variant $-$ reference), paired by seed,"
                 r" $\pm$ half-width of the 95\% $t$-interval."]
    return Table(header, rows, {"held-out loss": "std", "Δ vs CoCoMix": "ci95", "Δ vs NTP": "ci95"},
                 notes_md, notes_tex)


# What the read-out slot does (cocomix/diagnostics.py): column -> (final metrics key, digits)
DIAGNOSTICS = {
    "held-out loss": ("val/loss", 4),
    "loss without concept code": ("val/loss_no_concept", 4),
    "read-out attention to own token": ("val/readout_self_attn", 3),
    "uniform": ("val/readout_self_attn_uniform", 3),
    "concept acc (top-1)": ("val/concept_acc", 3),
}


def diagnostics_table(runs: list[Run]) -> Table:
    """Every interleaving variant (pause, CoCoMix, its ablations) with its final read-out diagnostics,
    mean ± std over seeds; '–' where a variant has no such quantity (pause has no concept code)."""
    header = ["scale", "variant", "seeds", *DIAGNOSTICS, "mlflow runs"]
    rows = []
    groups = group(runs)
    for scale in sorted({r.scale for r in runs}):
        labels = [lab for (sc, lab), rs in groups.items()
                  if sc == scale and any("val/readout_self_attn" in r.final for r in rs)]
        for label in label_order(labels):
            rs = groups[(scale, label)]
            cells: list[Cell | str] = [scale, label, str(len(rs))]
            for key, digits in DIAGNOSTICS.values():
                values = [r.final[key] for r in rs if key in r.final]
                cells.append(Cell(*mean_std(values), digits=digits) if len(values) == len(rs) else MISSING)
            rows.append(cells + [ids(rs)])
    notes_md = ["Final in-training evaluation, mean ± one standard deviation over seeds. Read-out attention: the "
                "attention mass the slot the LM head reads gives its own token, mean over the blocks above the "
                "insertion point, their heads and the positions; uniform: the same for attention spread evenly "
                "over the prefix. Loss without concept code: the held-out loss with every concept logit scaled "
                "to 0 before TopK. Concept acc: top-1 predicted concept = the first label."]
    notes_tex = [r"Final in-training evaluation, mean $\pm$ one standard deviation over seeds. Read-out attention:"
                 r" attention mass the slot the LM head reads gives its own token (blocks above the insertion"
                 r" point, heads and positions averaged); uniform: the same for attention spread evenly over the"
                 r" prefix. Loss without concept code: every concept logit scaled to 0 before TopK."]
    return Table(header, rows, {k: "std" for k in DIAGNOSTICS}, notes_md, notes_tex,
                 tex_panels=[["scale", "variant", "seeds", "held-out loss", "loss without concept code"],
                             ["scale", "variant", "read-out attention to own token", "uniform", "concept acc (top-1)"]])


def teacher_table(runs: list[Run], teacher: dict | None) -> Table:
    """The teacher (the experiment's own NTP run, when the DAG trains it) against every method's
    students: tokens trained and final held-out loss (the same validation blocks), and the gap."""
    header = ["model", "seeds", "tokens", "held-out loss", "gap to teacher (nats)", "mlflow runs"]
    rows: list[list[Cell | str]] = []
    t_loss = teacher["val/loss"] if teacher else None
    if teacher:
        rows.append(["teacher", "1", f"{teacher['tokens_seen']:,}", Cell(t_loss, digits=4), MISSING,
                     teacher.get("mlflow_run_id") or "(untracked:teacher)"])
    for (scale, label), rs in group([r for r in runs if r.ablation is None]).items():
        losses = [r.final["val/loss"] for r in rs]
        gap = Cell(*mean_std([v - t_loss for v in losses]), digits=4, signed=True) if teacher else MISSING
        tokens = sorted({r.final["tokens_seen"] for r in rs})
        rows.append([f"{label} ({scale})", str(len(rs)), " / ".join(f"{t:,}" for t in tokens),
                     Cell(*mean_std(losses), digits=4), gap, ids(rs)])
    notes_md = ["Final in-training held-out loss on the same validation blocks, students: mean ± one standard "
                "deviation over seeds. Gap: student minus teacher (positive: the teacher is better)."]
    notes_tex = [r"Final in-training held-out loss on the same validation blocks; students: mean $\pm$ one"
                 r" standard deviation over seeds. Gap: student minus teacher (positive: the teacher is better)."]
    return Table(header, rows, {"held-out loss": "std", "gap to teacher (nats)": "std"}, notes_md, notes_tex)


# The SAE's metrics.json (cocomix/sae.py): column -> (key, digits)
SAE_COLUMNS = {
    "FVU": ("fvu", 4),
    "L0": ("l0", 1),
    "dead latents": ("dead_fraction", 3),
    "loss increase (nats)": ("loss_increase", 4),
    "concept AUROC (best latent)": ("recovery/best_auroc", 3),
    "untrained SAE": ("recovery/untrained_best_auroc", 3),
    "random latent": ("recovery/random_auroc", 3),
    "best 8 latents (held out)": ("recovery/top8_auroc", 3),
    "untrained SAE (8 latents)": ("recovery/untrained_top8_auroc", 3),
}


def sae_table(sae: dict | None, cfg) -> Table:
    """The TopK SAE on the teacher's residual stream: reconstruction, and on the synthetic corpus how well
    its best latent per ground-truth concept detects that concept, against an untrained SAE of the
    same size (what picking the best of many random directions gives) and a blindly picked latent."""
    header = ["layer", "latents", "k", *SAE_COLUMNS, "margin over untrained", "margin (8 latents)", "mlflow run"]
    rows: list[list[Cell | str]] = []
    if sae:
        cells: list[Cell | str] = [str(cfg.sae.layer), str(cfg.sae.n_latents), str(cfg.sae.k)]
        cells += [Cell(sae[key], digits=d) if key in sae else MISSING for key, d in SAE_COLUMNS.values()]

        def margin(key: str) -> Cell:
            trained, untrained = sae.get(f"recovery/{key}"), sae.get(f"recovery/untrained_{key}")
            return MISSING if trained is None or untrained is None else Cell(trained - untrained, digits=3, signed=True)

        cells += [margin("best_auroc"), margin("top8_auroc"), sae.get("mlflow_run_id") or "(untracked:sae)"]
        rows.append(cells)
    notes_md = ["FVU: fraction of the activations' variance the reconstruction leaves unexplained; loss increase: "
                "the teacher's held-out loss with its activation replaced by the reconstruction minus without. "
                "Concept AUROC (synthetic corpus only): per ground-truth concept the best latent's AUROC as a "
                "detector of the tokens carrying it, mean over concepts; untrained SAE: the same for an SAE of the "
                "same size at initialisation; random latent: a latent picked blindly. Best 8 latents: a concept "
                "spread over a few latents (one per cluster of its words, say): per concept the 8 latents with the "
                "best AUROC on the first half of the tokens, standardised and summed, scored on the second half."]
    notes_tex = [r"FVU: fraction of variance unexplained; loss increase: teacher's held-out loss with the"
                 r" reconstruction minus without. Concept AUROC (synthetic corpus): per ground-truth concept the"
                 r" best latent's AUROC, mean over concepts; untrained SAE: the same at initialisation. Best 8"
                 r" latents: the 8 best on half the tokens, summed, scored on the other half."]
    return Table(header, rows, {}, notes_md, notes_tex,
                 tex_panels=[["layer", "latents", "k", "FVU", "L0", "dead latents", "loss increase (nats)"],
                             ["concept AUROC (best latent)", "untrained SAE", "random latent", "margin over untrained"],
                             ["best 8 latents (held out)", "untrained SAE (8 latents)", "margin (8 latents)"]])


def read_json(path: Path) -> dict | None:
    """A JSON record the DAG wrote, None when absent; one line naming the file when damaged."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        raise DataError(f"{path}: not valid JSON (damaged); rerun the job that writes it") from None


def diagnostic_curves(runs: list[Run], key: str, minus: str | None = None) -> list[list[tuple[float, float]]]:
    """Per run, (tokens, value of `key` [- value of `minus`]) at every evaluation that has them."""
    return [[(rec["tokens_seen"], rec[key] - (rec[minus] if minus else 0.0)) for rec in r.val_history
             if key in rec and (minus is None or minus in rec)] for r in runs]


# ----------------------------------------------------------------------------------------
# Curve aggregation (what the plots draw; tested as numbers)
# ----------------------------------------------------------------------------------------


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


def label_order(labels) -> list[str]:
    return sorted(labels, key=lambda lab: (METHOD_ORDER.index(lab) if lab in METHOD_ORDER else len(METHOD_ORDER), lab))


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


def _colors(labels: list[str]) -> dict[str, str]:
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    return {lab: cycle[i % len(cycle)] for i, lab in enumerate(label_order(labels))}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from matplotlib.ticker import EngFormatter

    for ax in fig.axes:  # 250k, not 250000 (long tick labels run into each other)
        if ax.get_xlabel().startswith("tokens seen"):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")  # tight: nothing clipped
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def _no_data(ax, text: str = "no evaluations yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _band(ax, x, band: Band, color) -> None:
    """The mean as a line, the band as a light fill with thin edges (several bands stay readable)."""
    ax.plot(x, band.mean, color=color)
    if band.n > 1:
        ax.fill_between(x, band.lo, band.hi, color=color, alpha=0.12, linewidth=0)
        for edge in (band.lo, band.hi):
            ax.plot(x, edge, color=color, linewidth=0.6, alpha=0.6)


def _legend(fig, labels: list[str], colors: dict[str, str], n: dict[str, int], extra=()) -> None:
    """One legend for the figure, right of the panels (it covers no data)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[lab], label=f"{lab} ({n[lab]} seed{'s' if n[lab] > 1 else ''})")
               for lab in labels if lab in n]
    handles += list(extra)
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def plot_heldout(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    with_flops = bool(groups) and all(r.training_flops_per_token for rs in groups.values() for r in rs)
    fig, axes = plt.subplots(1, 3 if with_flops else 2, figsize=(16 if with_flops else 11, 4.2),
                             layout="constrained")
    ax_loss, ax_delta = axes[0], axes[1]
    ntp = groups.get("ntp")
    seeds, deltas = {}, 0
    for label in label_order(groups):
        rs, color = groups[label], colors[label]
        band = seed_band([r.curve for r in rs], "std")
        if band is None:
            continue
        seeds[label] = band.n
        _band(ax_loss, band.x, band, color)
        if with_flops:
            fpt = sum(r.training_flops_per_token for r in rs) / len(rs)
            _band(axes[2], [t * fpt for t in band.x], band, color)
        if ntp and label != "ntp":
            delta = seed_band(delta_curves(rs, ntp), "t95")
            if delta is not None:
                _band(ax_delta, delta.x, delta, color)
                deltas += 1
    ax_loss.set(xlabel="tokens seen", ylabel="held-out loss (nats/token)",
                title="held-out loss: mean over seeds, band ±1 std")
    ax_delta.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax_delta.set(xlabel="tokens seen", ylabel="held-out loss − NTP's (nats/token)",
                 title="minus NTP (same seed): mean, band 95% t-interval")
    if with_flops:
        axes[2].set(xlabel="training FLOPs (student + teacher)", ylabel="held-out loss (nats/token)",
                    title="against training FLOPs, band ±1 std")
    if not seeds:
        _no_data(ax_loss)
    if not deltas:
        _no_data(ax_delta, "no NTP run to compare with" if not ntp else "no other method")
    _legend(fig, label_order(groups), colors, seeds)
    fig.suptitle(f"scale {scale}: held-out loss (in-training estimate) against tokens")
    return _save(fig, path)


def plot_downstream(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    fig, (ax_curve, ax_tasks) = plt.subplots(1, 2, figsize=(13, 4.4), layout="constrained",
                                             gridspec_kw={"width_ratios": [1, 1.3]})
    labels = label_order(groups)
    curves = {label: downstream_curve(groups[label]) for label in labels}
    curves = {label: c for label, c in curves.items() if c is not None}
    span = max((max(c.x) - min(c.x) for c in curves.values()), default=0.0) or 1.0
    for j, (label, curve) in enumerate(curves.items()):
        dodge = (j - (len(curves) - 1) / 2) * 0.012 * span  # error bars side by side, not on top of each other
        ax_curve.errorbar([x + dodge for x in curve.x], curve.mean, yerr=[0.0 if s is None else s for s in curve.se],
                          color=colors[label], marker="o", markersize=3, capsize=3)
    avg_keys = sorted({tuple(accuracy_keys(r.downstream)) for rs in groups.values() for r in rs if r.downstream})
    chance = average_chance(list(avg_keys[0])) if len(avg_keys) == 1 else None
    if chance is not None:
        ax_curve.axhline(chance, color="black", linestyle=":", linewidth=1.2)
        ax_curve.annotate(f"chance {chance:.3f}", (0.01, chance), xycoords=("axes fraction", "data"),
                          xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax_curve.set(xlabel="tokens seen", ylabel="average accuracy",
                 title="average accuracy: mean over seeds ±1 combined SE")
    if not curves:
        _no_data(ax_curve)

    keys = [k for k in ACCURACY_KEYS + extra_accuracy_keys(runs)
            if any(k in r.downstream for rs in groups.values() for r in rs)]
    scores = {label: final_task_scores(groups[label], keys) for label in labels}
    width = 0.8 / max(1, len(labels))
    for i, key in enumerate(keys):
        for j, label in enumerate(labels):
            if key in scores[label]:
                m, se = scores[label][key]
                ax_tasks.bar(i - 0.4 + (j + 0.5) * width, m, width, yerr=0.0 if se is None else se, capsize=2,
                             color=colors[label], error_kw={"elinewidth": 0.8})
        if key in CHANCE:
            ax_tasks.hlines(CHANCE[key], i - 0.45, i + 0.45, color="black", linestyle=":", linewidth=1.2)
    ax_tasks.set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
    ax_tasks.set(ylabel="accuracy", title="each task at the last checkpoint: mean ±1 combined SE")
    if not keys:
        _no_data(ax_tasks)
    n = {label: len(groups[label]) for label in labels if curves.get(label) or any(scores[label].values())}
    chance_handle = Line2D([], [], color="black", linestyle=":", label="chance (1 / choices;\nits mean for the average)")
    _legend(fig, labels, colors, n, extra=[chance_handle] if chance is not None or any(k in CHANCE for k in keys) else [])
    fig.suptitle(f"scale {scale}: downstream accuracy (error bars: sqrt(s²/n + mean SE_i²), see the tables' note)")
    return _save(fig, path)


def plot_diagnostics(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    panels = [("val/readout_self_attn", None, "attention mass to own token",
               "read-out slot's attention to its own token\n(dotted: uniform over the prefix)"),
              ("val/loss_no_concept", "val/loss", "loss without concept code − loss (nats)",
               "what the concept code carries: loss increase\nwith every concept logit scaled to 0"),
              ("val/concept_acc", None, "top-1 concept accuracy", "concept prediction: top-1 = first label")]
    seeds: dict[str, int] = {}
    for ax, (key, minus, ylabel, title) in zip(axes, panels):
        drawn = 0
        for label in label_order(groups):
            band = seed_band(diagnostic_curves(groups[label], key, minus), "std")
            if band is None or not band.x:
                continue
            _band(ax, band.x, band, colors[label])
            seeds[label], drawn = band.n, drawn + 1
            if key == "val/readout_self_attn":
                uniform = seed_band(diagnostic_curves(groups[label], "val/readout_self_attn_uniform"), "std")
                if uniform is not None and uniform.x:
                    ax.plot(uniform.x, uniform.mean, color=colors[label], linestyle=":", linewidth=1.2)
        if minus:
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set(xlabel="tokens seen", ylabel=ylabel, title=title)
        if not drawn:
            _no_data(ax, "no run with this diagnostic")
    _legend(fig, label_order(groups), colors, seeds)
    fig.suptitle(f"scale {scale}: read-out diagnostics of the interleaving methods (mean over seeds, band ±1 std)")
    return _save(fig, path)


def plot_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors({r.label for r in runs})
    written = []
    for scale in sorted({r.scale for r in runs}):
        written.append(plot_heldout(runs, scale, out_dir / f"heldout_loss_{scale}.png", colors))
        written.append(plot_downstream(runs, scale, out_dir / f"downstream_{scale}.png", colors))
        written.append(plot_diagnostics(runs, scale, out_dir / f"diagnostics_{scale}.png", colors))
    return written


def report(config_path: str | Path) -> Path:
    cfg = load_config(config_path)
    runs = load_runs(config_path)
    spec = teacher_spec(config_path)  # the DAG's own teacher run (none when teacher.path is given)
    teacher = read_json(spec.config(config_path).run_dir / "final_metrics.json") if spec else None
    tables = cfg.experiment_dir / "tables"
    for folder in (tables, cfg.experiment_dir / "plots"):
        clear_stale_tmp(folder)  # what a killed report left
    exp = cfg.experiment
    for name, table, caption in (
        ("main", main_table(runs), f"{exp}: held-out perplexity and downstream scores, mean over seeds ± standard "
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
    ):
        write_table(tables, name, table, caption=caption)
    plot_curves(runs, cfg.experiment_dir / "plots")
    return cfg.experiment_dir
