"""An experiment's runs as the report reads them: every planned run's folder (final_metrics.json,
metrics.jsonl, the per-checkpoint eval.json files), the teacher's and the SAE's records, and the runs
grouped by scale and method, paired by seed and named by their MLflow run ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cocomix.plan import plan_runs
from cocomix.data import DataError
from cocomix.files import read_json as read_json_file, read_sealed_json
from cocomix.checkpoints import checkpoint_files
from cocomix.records import MetricsLog
from cocomix.tracking import run_id_of

from .stats import average_with_se


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


# Fixed colours per method (the same in every plot); ablations and others take the next ones.
METHOD_ORDER = ["ntp", "kd", "pause", "cocomix"]


@dataclass
class Run:
    name: str
    method: str
    scale: str
    seed: int
    ablation: str | None
    run_dir: Path
    run_id: str | None  # of the tracked run (MLflow's or W&B's), None when untracked
    final: dict
    curve: list[tuple[int, float]]  # (tokens seen, held-out loss)
    downstream: dict[str, float] = field(default_factory=dict)  # final checkpoint's eval metrics
    # (tokens, average accuracy, its lm-eval standard error or None) per evaluated checkpoint
    downstream_curve: list[tuple[int, float, float | None]] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)  # every in-training evaluation record (val/*)
    eval_settings: dict | None = None  # what the final checkpoint's eval.json was made with
    final_eval: tuple[Path, dict] | None = None  # (its checkpoint folder, its eval.json record)
    arm: str | None = None  # a compute-matched NTP arm: the method whose FLOPs it matches ('+': amortised)
    data_seed: int | None = None  # train.data_seed where dag.data_seeds crosses the seeds (None: the seed's)

    @property
    def pair_key(self) -> tuple[int, int | None]:
        """What pairs a run with another method's: the same init seed and the same data order."""
        return (self.seed, self.data_seed)

    @property
    def label(self) -> str:
        return self.ablation or (f"ntp@{self.arm}" if self.arm else self.method)

    @property
    def training_flops_per_token(self) -> float | None:
        """Student plus teacher FLOPs per training token (cocomix/flops.py), when recorded."""
        if "flops_per_token" not in self.final:
            return None
        return float(self.final["flops_per_token"]) + float(self.final.get("teacher_flops_per_token") or 0)


def load_eval_jsons(run_dir: Path, with_folders: bool = False) -> list:
    """Per-checkpoint evaluation results written by `cocomix eval`, sorted by tokens seen (with
    `with_folders`, (checkpoint folder, record) pairs)."""
    out = []
    for path in checkpoint_files(run_dir, "eval.json", complete_only=False):
        record = read_sealed_json(path)
        if record is None:  # a table silently missing a point would be worse than no table
            raise DataError(f"{path}: damaged (not the record `cocomix eval` wrote); run `cocomix eval {run_dir}` "
                            "again, it re-evaluates that checkpoint")
        out.append((path.parent, record))
    out.sort(key=lambda fr: fr[1].get("tokens_seen", 0))
    return out if with_folders else [r for _, r in out]


def read_samples(folder: Path, record: dict) -> dict[str, dict[str, list]] | None:
    """The per-document scores (lm_eval_samples.json.gz) an eval.json record wrote beside it in its
    checkpoint `folder`; None when it has none (tasks off, or evaluated before they were kept). A file
    that does not match the sha256 the record sealed is one line."""
    import gzip
    import hashlib
    import json

    entry = record.get("lm_eval_samples")
    path = folder / entry["file"] if entry else None
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path}: does not match the sha256 its eval.json recorded (damaged or replaced); "
                        f"run `cocomix eval` on its run again")
    return json.loads(gzip.decompress(data))


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
            final = read_json_file(final_path)
        except ValueError:
            raise DataError(f"{final_path}: not valid JSON (damaged); rerun the training, it rewrites it") from None
        history = [rec for rec in MetricsLog(cfg.run_dir / "metrics.jsonl").read() if "val/loss" in rec]
        curve = [(rec["tokens_seen"], rec["val/loss"]) for rec in history]
        run = Run(spec.name, spec.method, spec.scale or "base", spec.seed, spec.ablation, cfg.run_dir,
                  run_id_of(final), final, curve, val_history=history, arm=spec.arm,
                  data_seed=spec.data_seed)
        evals_at = load_eval_jsons(cfg.run_dir, with_folders=True)
        evals = [r for _, r in evals_at]
        for ev in evals:
            m = ev.get("metrics", {})
            keys = accuracy_keys(m)
            if keys:
                run.downstream_curve.append((ev["tokens_seen"], *average_with_se(m, keys)))
        if evals:
            run.downstream = evals[-1].get("metrics", {})
            run.eval_settings = evals[-1].get("settings")
            run.final_eval = evals_at[-1]
        runs.append(run)
    warn_mixed_settings(runs)
    return runs


def warn_mixed_settings(runs: list[Run]) -> list[str]:
    """One warning line per table cell (scale, method) whose runs' evaluations were made under different
    settings (tasks, document limit, task data, perplexity blocks): the cell would average unlike numbers."""
    import sys

    lines = []
    for (scale, label), cell in group(runs).items():
        made = [r.eval_settings for r in cell if r.eval_settings is not None]
        differ = sorted({k for a in made for b in made for k in set(a) | set(b) if a.get(k) != b.get(k)})
        if differ:
            lines.append(f"warning: report: {label} at {scale}: its runs' evaluations differ in {', '.join(differ)} "
                         f"({', '.join(r.name for r in cell)}); rerun `cocomix eval --force` on them with one setting")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def paired(runs: list[Run], refs: list[Run]) -> list[tuple[Run, Run]]:
    """(run, reference run of the same seed) for every seed both have, by seed."""
    by_seed = {r.pair_key: r for r in refs}
    return [(r, by_seed[r.pair_key]) for r in sorted(runs, key=_order) if r.pair_key in by_seed]


def _order(r: Run) -> tuple[int, int]:
    return (r.seed, -1 if r.data_seed is None else r.data_seed)


def group(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    out: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        out.setdefault((r.scale, r.label), []).append(r)
    return out


def ids(runs: list[Run]) -> str:
    return " ".join(r.run_id or f"(untracked:{r.name})" for r in sorted(runs, key=_order))


def heldout_ppl(r: Run) -> float:
    """Full-protocol perplexity from `cocomix eval` when present, else the in-training estimate."""
    return r.downstream.get("val_ppl", r.final["val/ppl"])


def extra_accuracy_keys(runs: list[Run]) -> list[str]:
    """Accuracies of tasks beyond the paper's seven (e.g. the synthetic corpus's tasks)."""
    paper = {k for _, k, _ in DOWNSTREAM}
    return sorted({k for r in runs for k in r.downstream if k.endswith("/acc") and k not in paper})


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


def read_json(path: Path) -> dict | None:
    """A JSON record the DAG wrote, None when absent; one line naming the file when damaged."""
    if not path.exists():
        return None
    try:
        return read_json_file(path)
    except ValueError:
        raise DataError(f"{path}: not valid JSON (damaged); rerun the job that writes it") from None


def diagnostic_curves(runs: list[Run], key: str, minus: str | None = None) -> list[list[tuple[float, float]]]:
    """Per run, (tokens, value of `key` [- value of `minus`]) at every evaluation that has them."""
    return [[(rec["tokens_seen"], rec[key] - (rec[minus] if minus else 0.0)) for rec in r.val_history
             if key in rec and (minus is None or minus in rec)] for r in runs]


def label_order(labels) -> list[str]:
    return sorted(labels, key=lambda lab: (METHOD_ORDER.index(lab) if lab in METHOD_ORDER else len(METHOD_ORDER), lab))
