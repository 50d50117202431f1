"""Which runs an experiment consists of: every (method, scale, seed) of `dag`, its ablations, and the
teacher run. A pure function of the config file, shared by the Snakemake DAG (`cocomix/dag.py`) and
the reports (`evals/report/`), which read exactly the runs planned here.

Method names are the registry's (`cocomix.methods`): the config layer does not know them, so the
plan checks `dag.methods` and the keys of `method_overrides` before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cocomix.config import Config, ConfigError, load_config
from cocomix.methods import method_names

# Ablations are CoCoMix runs with a few overrides (`dag.ablations`, the paper's Fig. 6).
ABLATION_METHOD = "cocomix"


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


def run_spec(method: str, scale: str | None, seed: int, ablation: str | None = None, extra=()) -> RunSpec:
    name = f"{ablation or method}-{scale or 'base'}-s{seed}"
    overrides = [f"method={method}", f"seed={seed}", f"run_name={name}"]
    if scale:
        overrides.append(f"scale={scale}")
    if ablation:  # MLflow tag `ablation` (runs that are not ablations: "none"); not in the fingerprint
        overrides.append(f"tracking.tags.ablation={ablation}")
    return RunSpec(name, method, scale, seed, tuple(overrides) + tuple(extra), ablation)


def check_method_names(base: Config) -> None:
    """`dag.methods` and `method_overrides` name registered methods (one-line ConfigError otherwise)."""
    known = method_names()
    for i, name in enumerate(base.dag.methods):
        if name not in known:
            raise ConfigError(f"config key 'dag.methods[{i}]': expected one of {known}, got {name!r}")
    for name in base.method_overrides:
        if name not in known:
            raise ConfigError(f"config key 'method_overrides.{name}': expected a method name, one of {known}, "
                              f"got {name!r}")


def plan_runs(config_path: str | Path) -> list[RunSpec]:
    """Every (method, scale, seed) run, then every ablation (CoCoMix + overrides) per scale and seed.
    Every run's resolved config is loaded (validated) before this returns."""
    base = load_config(config_path)
    check_method_names(base)
    scales = base.dag.scales or [base.scale]
    runs = [run_spec(m, sc, s) for sc in scales for m in base.dag.methods
            for s in base.dag.method_seeds.get(m, base.dag.seeds)]
    for name, overrides in base.dag.ablations.items():
        extra = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
        seeds = base.dag.seeds if base.dag.ablation_seeds is None else base.dag.ablation_seeds
        ab_scales = scales if base.dag.ablation_scales is None else base.dag.ablation_scales
        runs += [run_spec(ABLATION_METHOD, sc, s, ablation=name, extra=extra) for sc in ab_scales for s in seeds]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
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
