"""Tables and plots for an experiment: `cocomix report --config ...`.

Reads every planned run's folder (config, metrics.jsonl, final_metrics.json, per-checkpoint
evaluation JSONs) and writes, under `<experiment_dir>/tables/` and `/plots/`:

- main.{md,tex,csv}: per scale and method, held-out perplexity and downstream scores (the layout
  of the paper's Table 1), mean +- std over seeds;
- sample_efficiency.{md,tex,csv}: tokens each method needs to reach the NTP run's final held-out
  loss (same scale and seed), read off its evaluation curve by linear interpolation, and the
  percentage of tokens saved, as mean and 95% t-interval over seeds; "not reached" is reported;
- ablations.{md,tex,csv}: CoCoMix and each ablation, final held-out loss and the difference to
  CoCoMix and to NTP;
- plots/heldout_loss_<scale>.png and plots/downstream_<scale>.png: curves against tokens.

Every row lists the MLflow run ids it aggregates, so any cell can be traced to its runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cocomix.config import load_config
from cocomix.plan import plan_runs
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
    downstream_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, average accuracy)

    @property
    def label(self) -> str:
        return self.ablation or self.method


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
        curve = [(rec["tokens_seen"], rec["val/loss"]) for rec in MetricsLog(cfg.run_dir / "metrics.jsonl").read()
                 if "val/loss" in rec]
        run = Run(spec.name, spec.method, spec.scale or "base", spec.seed, spec.ablation, cfg.run_dir,
                  final.get("mlflow_run_id"), final, curve)
        evals = load_eval_jsons(cfg.run_dir)
        for ev in evals:
            m = ev.get("metrics", {})
            keys = [k for k in ACCURACY_KEYS if k in m] or [k for k in m if k.endswith("/acc")]
            accs = [m[k] for k in keys]
            if accs:
                run.downstream_curve.append((ev["tokens_seen"], sum(accs) / len(accs)))
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


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------


def fmt(mean: float | None, spread: float | None = None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def write_table(out_dir: Path, name: str, header: list[str], rows: list[list[str]], caption: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"<!-- {caption} -->", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")

    def tex_escape(s: str) -> str:
        return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("±", "$\\pm$").replace("–", "--")

    tex = ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex_escape(caption)}}}",
           "\\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", "\\toprule",
           " & ".join(tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(tex_escape(c) for c in r) + " \\\\" for r in rows]
    tex += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    atomic_write_text(out_dir / f"{name}.tex", "\n".join(tex) + "\n")

    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
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


def main_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    extra = extra_accuracy_keys(runs)
    header = (["scale", "method", "seeds", "held-out ppl"] + [c for c, _, _ in DOWNSTREAM] + ["avg ppl", "avg acc"]
              + extra + ["mlflow runs"])
    rows = []
    for (scale, label), rs in group([r for r in runs if r.ablation is None]).items():
        cells = [scale, label, str(len(rs)), fmt(*mean_std([heldout_ppl(r) for r in rs]))]
        per_run_ppl, per_run_acc = [], []
        for r in rs:
            ppls = [heldout_ppl(r)] + [r.downstream[k] for _, k, lower in DOWNSTREAM if lower and k in r.downstream]
            per_run_ppl.append(sum(ppls) / len(ppls) if len(ppls) == 3 else float("nan"))
            accs = [r.downstream[k] for k in ACCURACY_KEYS if k in r.downstream]
            per_run_acc.append(100 * sum(accs) / len(accs) if len(accs) == len(ACCURACY_KEYS) else float("nan"))
        for _, key, lower in DOWNSTREAM:
            vals = [r.downstream[key] for r in rs if key in r.downstream]
            scale_by = 1 if lower else 100
            cells.append(fmt(*mean_std([scale_by * v for v in vals])) if len(vals) == len(rs) else "–")
        for vals in (per_run_ppl, per_run_acc):
            cells.append("–" if any(math.isnan(v) for v in vals) else fmt(*mean_std(vals)))
        for key in extra:
            vals = [100 * r.downstream[key] for r in rs if key in r.downstream]
            cells.append(fmt(*mean_std(vals)) if len(vals) == len(rs) else "–")
        cells.append(ids(rs))
        rows.append(cells)
    return header, rows


def sample_efficiency_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["scale", "method", "seeds reaching NTP", "tokens to NTP's final loss", "tokens saved (%)", "mlflow runs"]
    rows = []
    ntp = {(r.scale, r.seed): r for r in runs if r.method == "ntp" and r.ablation is None}
    for (scale, label), rs in group(runs).items():
        if label == "ntp":
            continue
        reached, saved, used = [], [], []
        for r in rs:
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
        tok = fmt(*mean_ci95(reached), digits=0) if reached else "not reached"
        sav = fmt(*mean_ci95(saved), digits=1) if reached else "–"
        rows.append([scale, label, f"{len(reached)}/{len(used)}", tok, sav, ids(used)])
    return header, rows


def ablation_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
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
            loss = mean_std([r.final["val/loss"] for r in rs])
            d_c = loss[0] - mean_std([r.final["val/loss"] for r in ref_c])[0] if ref_c else None
            d_n = loss[0] - mean_std([r.final["val/loss"] for r in ref_n])[0] if ref_n else None
            rows.append([scale, v, str(len(rs)), fmt(*loss, digits=4),
                         "–" if d_c is None else f"{d_c:+.4f}", "–" if d_n is None else f"{d_n:+.4f}", ids(rs)])
    return header, rows


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


def plot_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for scale in sorted({r.scale for r in runs}):
        for kind, attr, ylabel in (("heldout_loss", "curve", "held-out loss (nats/token)"),
                                   ("downstream", "downstream_curve", "average downstream accuracy")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for (sc, label), rs in sorted(group(runs).items()):
                if sc != scale:
                    continue
                prev_color = None
                for i, r in enumerate(sorted(rs, key=lambda r: r.seed)):
                    pts = getattr(r, attr)
                    if pts:
                        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.85,
                                        label=label if prev_color is None else None,
                                        color=prev_color, linestyle="-" if prev_color is None else "--")
                        prev_color = line.get_color()
            ax.set_xlabel("tokens seen")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} — scale {scale} (dashed: further seeds)")
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
            path = out_dir / f"{kind}_{scale}.png"
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=120)
            plt.close(fig)
            atomic_write_bytes(path, png.getvalue())
            written.append(path)
    return written


def report(config_path: str | Path) -> Path:
    cfg = load_config(config_path)
    runs = load_runs(config_path)
    tables = cfg.experiment_dir / "tables"
    for folder in (tables, cfg.experiment_dir / "plots"):
        clear_stale_tmp(folder)  # what a killed report left
    write_table(tables, "main", *main_table(runs),
                caption=f"{cfg.experiment}: held-out perplexity and downstream scores, mean ± std over seeds")
    write_table(tables, "sample_efficiency", *sample_efficiency_table(runs),
                caption=f"{cfg.experiment}: tokens to reach the NTP run's final held-out loss (same scale and seed), "
                        "mean ± 95% t-interval over seeds")
    write_table(tables, "ablations", *ablation_table(runs),
                caption=f"{cfg.experiment}: final held-out loss of CoCoMix and its ablations, mean ± std over seeds")
    plot_curves(runs, cfg.experiment_dir / "plots")
    return cfg.experiment_dir
