"""The tuning table: what `cocomix tune` gave every method (cocomix/tune.py): its trials, the tuning loss
of its defaults and of its best trial, and the values its runs were trained with (`dag.tuned`)."""

from __future__ import annotations

from pathlib import Path

from cocomix.config import Config
from cocomix.files import read_json
from cocomix.plan import best_path

from .runs import label_order
from .writers import MISSING, Cell, Table, tex_escape


def tuning_results(cfg: Config) -> dict[str, dict]:
    """method -> its best.json, for every method of dag.methods that has one."""
    out = {}
    for method in cfg.dag.methods:
        path: Path = best_path(cfg, method)
        if path.is_file():
            out[method] = read_json(path)
    return out


def tuning_line(cfg: Config, results: dict[str, dict]) -> str:
    """The line the main table carries: how the methods it compares were tuned."""
    if not cfg.dag.tuned:
        return ("Not tuned: every method at the config's values (the paper's defaults; dag.tuned: true tunes each "
                "method with the same budget, `cocomix tune`).")
    trials = sorted({r["trials"] for r in results.values()})
    return (f"Tuned per method, {'/'.join(map(str, trials))} trials each on the tuning split (never the validation "
            "split these numbers are on), the chosen values in the tuning table.")


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def tuning_table(cfg: Config, results: dict[str, dict]) -> Table:
    """`results`: `tuning_results(cfg)`."""
    header = ["method", "trials", "complete", "tokens per trial", "tuning loss at defaults", "best tuning loss",
              "chosen values"]
    rows = []
    for method in label_order(results):
        r = results[method]
        chosen = "; ".join(f"{k}={_value(v)}" for k, v in sorted(r["params"].items())) or MISSING
        rows.append([method, str(r["trials"]), str(r["complete"]), f"{r['tokens_per_trial']:,}",
                     Cell(r.get("defaults_value"), digits=4), Cell(r.get("best_value"), digits=4), chosen])
    if results:
        any_r = next(iter(results.values()))
        note = (f"One Optuna study per method (cocomix/tune.py), each with the same trials, tokens per trial, "
                f"{any_r['sampler']} sampler and seed {any_r['seed']}, over the method's own knobs; trials are scored "
                f"on the tuning split (the last {any_r['tune_blocks']} blocks of the training split, left out of the "
                "trials' training), never on the validation split. Tuning loss: held-out loss (nats) on that split; "
                "at defaults: the first trial, the configured values. "
                + ("The main runs trained with the chosen values (dag.tuned: true)." if cfg.dag.tuned else
                   "dag.tuned is false: the main runs did not use them."))
    else:
        note = "No method was tuned (no <experiment>/tuning/<method>/best.json; `cocomix tune` makes them)."
    return Table(header, rows, {}, [note], [tex_escape(note)])
