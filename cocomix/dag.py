"""Planning the experiment DAG: which runs exist, and what each one depends on.

The Snakefile stays thin: it asks this module for the list of runs and for a fingerprint of each
run's resolved config. The fingerprint holds only the config sections that the run's method reads
(`Method.uses`), so changing `kd.lam` reruns the KD runs and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cocomix.config import Config, load_config

# Sections every run depends on, whatever its method...
COMMON_SECTIONS = ("experiment", "method", "seed", "data", "tokenizer", "model", "train", "eval")
# ...less the keys that change how a run is executed or stored, not what it computes.
EXECUTION_KEYS = ("train.resume", "train.compile", "train.log_every_steps", "data.dir")


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str
    scale: str | None
    seed: int
    overrides: tuple[str, ...]
    """Command-line overrides that turn the experiment config into this run's config."""
    ablation: str | None = None

    def config(self, config_path: str | Path) -> Config:
        return load_config(config_path, list(self.overrides))


def _select(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def fingerprint(cfg: Config, method=None) -> str:
    """sha256 of the parts of the resolved config that can change this run's result."""
    from cocomix.methods import get_method

    tree = cfg.to_dict()
    keys = COMMON_SECTIONS + tuple((method or get_method(cfg.method)).uses)
    for dotted in EXECUTION_KEYS:
        section, key = dotted.split(".")
        tree[section].pop(key)
    picked = {k: _select(tree, k) for k in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_spec(method: str, scale: str | None, seed: int, ablation: str | None = None, extra=()) -> RunSpec:
    name = f"{ablation or method}-{scale or 'base'}-s{seed}"
    overrides = [f"method={method}", f"seed={seed}", f"run_name={name}"]
    if scale:
        overrides.append(f"scale={scale}")
    return RunSpec(name, method, scale, seed, tuple(overrides) + tuple(extra), ablation)


def plan_runs(config_path: str | Path) -> list[RunSpec]:
    """Every (method, scale, seed) run, then every ablation (CoCoMix + overrides) per scale and seed."""
    base = load_config(config_path)
    scales = base.dag.scales or [base.scale]
    runs = [run_spec(m, sc, s) for sc in scales for m in base.dag.methods for s in base.dag.seeds]
    for name, overrides in base.dag.ablations.items():
        extra = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
        seeds = base.dag.seeds if base.dag.ablation_seeds is None else base.dag.ablation_seeds
        ab_scales = scales if base.dag.ablation_scales is None else base.dag.ablation_scales
        runs += [run_spec("cocomix", sc, s, ablation=name, extra=extra) for sc in ab_scales for s in seeds]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        from cocomix.config import ConfigError

        raise ConfigError(f"config key 'dag.ablations': run names collide with method runs: {dupes}")
    for r in runs:  # validate every run's config before anything runs
        r.config(config_path)
    return runs


def teacher_spec(config_path: str | Path) -> RunSpec | None:
    """The NTP run that serves as teacher when `teacher.path` is unset (the embedded default)."""
    base = load_config(config_path)
    if base.teacher.path:
        return None
    extra = tuple(f"{k}={v}" for k, v in base.dag.teacher.items())
    return RunSpec("teacher", "ntp", None, base.seed,
                   ("method=ntp", f"seed={base.seed}", "run_name=teacher", "scale=null") + extra)
