"""Equal tuning: every method of `dag.methods` gets the same search, over its own knobs.

    cocomix tune --config config/tiny.yaml                 # every method, one after another
    cocomix tune --config config/tiny.yaml --method kd     # one method (the DAG's `tune` rule)

One Optuna study per method, through the sweep machinery (cocomix/sweep.py: storage, heartbeats,
resume, a tracked run per trial), each with the same number of trials (`tune.n_trials`), tokens per
trial (`tune.tokens`), sampler and sampler seed (`tune.sampler`, `tune.seed`). What is searched is the
method's own (`Method.tune_space`): the learning rate and warm-up for every method, KD's lambda and
temperature, CoCoMix's lambda, k and insertion layer, where the pauses enter; `tune.space.<method>`
changes ranges key by key. With `tune.defaults_first` the first trial of every study is the configured
values, so every method's search starts from its defaults.

Trials are scored on the tuning split (`eval.split: tune`: the last `eval.tune_blocks` blocks of the
training split, left out of the trials' training), never on the validation split the tables report.
The result of each method is <experiment>/tuning/<method>/best.json; `cocomix train --tuned FILE` (the
DAG with `dag.tuned: true`) trains with its values, the run's own overrides after them. Tuning happens
at the experiment's first scale (`dag.scales[0]`, or the config as it is), and its values serve every scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cocomix.config import Config, ConfigError, SweepParam, config_from_dict, load_config
from cocomix.files import atomic_write_json, read_json
from cocomix.plan import best_path
from cocomix.sweep import _flat_tree, sweep, sweep_dir


def method_config(config_path: str | Path, method: str) -> Config:
    """The experiment's run config of `method` at the tuning scale: its method_overrides applied."""
    base = load_config(config_path)
    scale = base.dag.scales[0] if base.dag.scales else base.scale
    return load_config(config_path, [f"method={method}"] + ([f"scale={scale}"] if scale else []))


def method_space(cfg: Config, method: str) -> dict[str, SweepParam]:
    """The method's knobs (`Method.tune_space`), with `tune.space.<method>` replacing or adding ranges."""
    from cocomix.methods import get_method  # lazy: torch/transformers; the Snakefile imports this module

    space = dict(get_method(method).tune_space(cfg))
    space.update(cfg.tune.space.get(method, {}))
    return space


def study_config(config_path: str | Path, method: str) -> Config:
    """The sweep of one method's study: its run config, scored on the tuning split, with the tuning
    budget; `tune.*` fills the sweep's settings so that every method's study has the same ones."""
    cfg = method_config(config_path, method)
    t = cfg.tune
    space = method_space(cfg, method)
    tree = _flat_tree(cfg)
    tree["eval"]["split"] = "tune"
    tree["sweep"].update(
        method=method, study=f"{cfg.experiment}-tune-{method}", n_trials=t.n_trials, tokens=t.tokens,
        sampler=t.sampler, n_startup_trials=t.n_startup_trials, seed=t.seed, pruner=t.pruner,
        pruner_startup_trials=max(1, t.n_startup_trials), space={k: vars(p) for k, p in space.items()},
        enqueue=[defaults(cfg, space)] if t.defaults_first else [], workers=1)
    return config_from_dict(tree)


def defaults(cfg: Config, space: dict[str, SweepParam]) -> dict[str, Any]:
    """The configured value of every searched key (the defaults trial); a warm-up left to the schedule
    (train.warmup_steps: null) is the value it resolves to for the trial's budget."""
    tree = cfg.to_dict()
    out = {}
    for key in space:
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    if "train.warmup_steps" in out:
        out["train.warmup_steps"] = cfg.train.warmup_for(cfg.tune.tokens)
    for key, p in space.items():  # a default outside a narrowed range is clipped into it
        if p.type != "categorical" and out[key] is not None:
            out[key] = type(out[key])(min(max(out[key], p.low), p.high))
    return out


def tune_method(config_path: str | Path, method: str) -> dict[str, Any]:
    """Run (or continue) one method's study; write and return its best.json."""
    scfg = study_config(config_path, method)
    summary = sweep(scfg, None, workers=1)  # storage failures: one line (sweep's own storage_errors)
    space = {k: vars(p) for k, p in scfg.sweep.space.items()}
    result = {"method": method, "study": summary["study"], "trials": scfg.sweep.n_trials,
              "complete": summary["complete"], "pruned": summary["pruned"], "failed": summary["failed"],
              "tokens_per_trial": scfg.sweep.tokens or scfg.train.tokens, "split": "tune",
              "tune_blocks": scfg.eval.tune_blocks, "sampler": scfg.sweep.sampler, "seed": scfg.sweep.seed,
              "space": space, "defaults": scfg.sweep.enqueue[0] if scfg.sweep.enqueue else None,
              "best_trial": summary.get("best_trial"), "best_value": summary.get("best_value"),
              "params": summary.get("best_params", {}), "trials_table": str(sweep_dir(scfg) / "trials.md")}
    # the defaults trial is trial 0 (enqueued when the study was created)
    result["defaults_value"] = summary["values"].get("0") if scfg.sweep.enqueue else None
    path = best_path(scfg, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=2, default=str)
    return result


def tune(config_path: str | Path, methods: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every method of `dag.methods` (or `methods`), one study each, one after another."""
    base = load_config(config_path)
    names = methods or list(base.dag.methods)
    for name in names:
        if name not in base.dag.methods:
            raise ConfigError(f"--method {name}: expected a method of dag.methods {base.dag.methods}")
    return {name: tune_method(config_path, name) for name in names}


def tuned_overrides(path: str | Path) -> list[str]:
    """The `key=value` overrides of a best.json (`cocomix train --tuned`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--tuned {path}: not found; run `cocomix tune` (or the DAG's tune rule) first")
    result = read_json(path)
    if not isinstance(result.get("params"), dict) or not result["params"]:
        raise ConfigError(f"--tuned {path}: no tuned values (no trial of study {result.get('study')!r} completed)")
    return [f"{k}={json.dumps(v)}" for k, v in sorted(result["params"].items())]
