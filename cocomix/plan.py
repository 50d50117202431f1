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
from cocomix.methods import get_method, method_names

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
    arm: str | None = None
    """A compute-matched NTP arm (`dag.compute_matched`): the method whose FLOPs its token budget matches,
    with a trailing '+' when the teacher's training, the SAE's and label extraction are amortised in."""
    data_seed: int | None = None
    """The run's `train.data_seed` where `dag.data_seeds` crosses the seeds with data-order seeds (run name
    suffix -d<data seed>); None: the seed sets the data order too."""

    @property
    def matched_run(self) -> str | None:
        """The run whose FLOPs this arm's budget matches (its method at the same scale and seed)."""
        if self.arm is None:
            return None
        return f"{self.arm.rstrip('+')}-{self.scale or 'base'}-s{self.seed}" + _data_suffix(self.data_seed)

    def config(self, config_path: str | Path) -> Config:
        return load_config(config_path, list(self.overrides))


def _data_suffix(data_seed: int | None) -> str:
    return "" if data_seed is None else f"-d{data_seed}"


def run_spec(method: str, scale: str | None, seed: int, ablation: str | None = None, extra=(),
             data_seed: int | None = None) -> RunSpec:
    name = f"{ablation or method}-{scale or 'base'}-s{seed}" + _data_suffix(data_seed)
    overrides = [f"method={method}", f"seed={seed}", f"run_name={name}"]
    if scale:
        overrides.append(f"scale={scale}")
    if ablation:  # MLflow tag `ablation` (runs that are not ablations: "none"); not in the fingerprint
        overrides.append(f"tracking.tags.ablation={ablation}")
    if data_seed is not None:
        overrides.append(f"train.data_seed={data_seed}")
    return RunSpec(name, method, scale, seed, tuple(overrides) + tuple(extra), ablation, data_seed=data_seed)


def best_path(cfg: Config, method: str) -> Path:
    """<experiment>/tuning/<method>/best.json: what `cocomix tune` chose for a method (cocomix/tune.py),
    which `cocomix train --tuned` applies to its runs (`dag.tuned`)."""
    return cfg.experiment_dir / "tuning" / method / "best.json"


def arm_spec(method: str, scale: str | None, seed: int, amortised: bool, data_seed: int | None = None) -> RunSpec:
    """The NTP run `ntp@<method>[+]-<scale>-s<seed>` whose budget matches that run's FLOPs (set at launch)."""
    arm = method + ("+" if amortised else "")
    name = f"ntp@{arm}-{scale or 'base'}-s{seed}" + _data_suffix(data_seed)
    overrides = ["method=ntp", f"seed={seed}", f"run_name={name}", f"tracking.tags.matches={arm}"]
    overrides += [f"scale={scale}"] if scale else []
    overrides += [f"train.data_seed={data_seed}"] if data_seed is not None else []
    return RunSpec(name, "ntp", scale, seed, tuple(overrides), arm=arm, data_seed=data_seed)


def compute_matched_arms(base: Config, config_path: str | Path, runs: list[RunSpec]) -> list[RunSpec]:
    """`dag.compute_matched`: for every main run of a method other than NTP, at each seed NTP also runs,
    the NTP arm at its per-step FLOPs, and (a method that reads a teacher, an SAE or labels) the arm at
    its FLOPs with the one-off items amortised. The amortised arms need the teacher's training FLOPs: a
    given teacher (teacher.path) must state them (teacher.training_flops)."""
    ntp_seeds = {(r.scale, r.seed, r.data_seed) for r in runs if r.method == "ntp" and r.ablation is None}
    if not ntp_seeds:
        raise ConfigError("config key 'dag.compute_matched': the arms are NTP runs paired with NTP's seeds; "
                          "dag.methods has no ntp")
    arms = []
    for r in runs:
        if r.method == "ntp" or r.ablation is not None or (r.scale, r.seed, r.data_seed) not in ntp_seeds:
            continue
        arms.append(arm_spec(r.method, r.scale, r.seed, amortised=False, data_seed=r.data_seed))
        cfg = r.config(config_path)
        if get_method(r.method).artifacts(cfg):
            if cfg.teacher.path and cfg.teacher.training_flops is None:
                raise ConfigError(f"config key 'dag.compute_matched': the amortised arm of {r.name} needs the teacher's "
                                  f"training FLOPs, and {cfg.teacher.path} is a given teacher; set "
                                  "teacher.training_flops (spec 4.5 for GPT-2) or turn the option off")
            arms.append(arm_spec(r.method, r.scale, r.seed, amortised=True, data_seed=r.data_seed))
    return arms


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
    data_seeds = base.dag.data_seeds or [None]  # crossed with the seeds: init and data order apart
    runs = [run_spec(m, sc, s, data_seed=d) for sc in scales for m in base.dag.methods
            for s in base.dag.method_seeds.get(m, base.dag.seeds) for d in data_seeds]
    for name, overrides in base.dag.ablations.items():
        extra = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
        seeds = base.dag.seeds if base.dag.ablation_seeds is None else base.dag.ablation_seeds
        ab_scales = scales if base.dag.ablation_scales is None else base.dag.ablation_scales
        runs += [run_spec(ABLATION_METHOD, sc, s, ablation=name, extra=extra, data_seed=d)
                 for sc in ab_scales for s in seeds for d in data_seeds]
    if base.dag.compute_matched:
        runs += compute_matched_arms(base, config_path, runs)
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
