"""What the Snakemake rules ask of the package: the planned runs (`cocomix/plan.py`) turned into the
files, overrides and fingerprints of each job.

The Snakefile builds one `Dag` from the experiment config; every input or params function of
`workflow/rules/*.smk` is a call on it. What a training run needs before it starts is asked of its
method (`Method.artifacts(cfg)`: teacher, SAE, label cache) and mapped to the file of the rule that
makes it, so no rule knows about any particular method. Params carry fingerprints of what each job
computes: change `kd.lam` and only the KD runs (and what reads them) rerun.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cocomix.config import Config, fingerprint, load_config
from cocomix.methods import get_method, run_fingerprint
from cocomix.plan import RunSpec, plan_runs, teacher_spec
from cocomix.sweep import study_name

# Every job runs offline: a wrong local path must fail at once, not retry the hub for minutes.
OFFLINE = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
# The CLI, run by the interpreter that runs Snakemake (the project's environment), whatever PATH says.
COCOMIX = f"{OFFLINE} {sys.executable} -m cocomix.cli"

# What the SAE and a label cache are computed from (their rules rerun when these change).
SAE_KEYS = ("data", "tokenizer", "teacher", "sae", "train.block_size")
LABEL_KEYS = ("data", "tokenizer", "teacher", "sae", "concept", "train.block_size")
TABLES = ("main", "sample_efficiency", "ablations")
# `cocomix sweep` searches CoCoMix's settings: every trial is a CoCoMix run (cocomix/sweep.py).
SWEEP_METHOD = "cocomix"


class Dag:
    """The experiment of one config file, as the rules see it."""

    def __init__(self, config_path: str | Path):
        self.config_path = str(config_path)
        self.base = load_config(self.config_path)
        self.runs: dict[str, RunSpec] = {r.name: r for r in plan_runs(self.config_path)}
        self.teacher: RunSpec | None = teacher_spec(self.config_path)
        self.exp = str(self.base.experiment_dir)
        self.cli = COCOMIX
        self.offline = OFFLINE
        self._configs: dict[str, Config] = {}
        # One representative run per label cache: its overrides tell extract-concepts how to score.
        self.label_specs: dict[str, RunSpec] = {}
        for name, spec in self.runs.items():
            cfg = self.config(name)
            variant = self.label_variant(cfg)
            if variant is not None and "labels" in self.artifacts(cfg):
                self.label_specs.setdefault(variant, spec)

    # ---- runs ----

    def spec(self, run: str) -> RunSpec:
        if run == "teacher" and self.teacher is not None:
            return self.teacher
        if run not in self.runs:
            raise KeyError(f"run {run!r} is not planned by {self.config_path} (planned: {sorted(self.runs)})")
        return self.runs[run]

    def config(self, run: str) -> Config:
        """The resolved config of a planned run (or the teacher), loaded once."""
        if run not in self._configs:
            self._configs[run] = self.spec(run).config(self.config_path)
        return self._configs[run]

    def overrides(self, run: str) -> str:
        """CLI overrides of a planned run (or the teacher), quoted for the shell."""
        return _quote(self.spec(run).overrides)

    def fingerprint(self, run: str) -> str:
        """Changes when (and only when) a config section this run's method reads changes."""
        return run_fingerprint(self.config(run))

    @staticmethod
    def artifacts(cfg: Config) -> frozenset[str]:
        return get_method(cfg.method).artifacts(cfg)

    def train_inputs(self, run: str) -> list[str]:
        """The data, and the artifacts the run's method needs (teacher, SAE, label cache) where the
        DAG makes them: a label cache stands for the teacher and SAE it is extracted with."""
        cfg = self.config(run)
        return [self.data_manifest()] + self.artifact_inputs(cfg, self.artifacts(cfg))

    def artifact_inputs(self, cfg: Config, artifacts) -> list[str]:
        files = []
        if "teacher" in artifacts:
            files += self.teacher_inputs(cfg)
        if "sae" in artifacts:
            files += self.sae_inputs(cfg)
        if "labels" in artifacts:
            files += self.label_inputs(cfg)
        return files

    @staticmethod
    def launcher(gpus: int) -> str:
        """The run's interpreter; several GPUs in one job (SLURM profile): DDP through torchrun."""
        if gpus > 1:
            return f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {gpus}"
        return sys.executable

    # ---- data, teacher, SAE, labels ----

    def data_manifest(self) -> str:
        return f"{self.exp}/data/manifest.json"

    def teacher_inputs(self, cfg: Config | None = None) -> list[str]:
        """The teacher run's output when the DAG trains the teacher (teacher.path unset)."""
        cfg = cfg or self.base
        return [f"{self.exp}/runs/teacher/final_metrics.json"] if self.teacher and not cfg.teacher.path else []

    def sae_inputs(self, cfg: Config | None = None) -> list[str]:
        """The trained SAE when the DAG trains it (sae.path unset, e.g. not OpenAI's GPT-2 SAE)."""
        cfg = cfg or self.base
        return [] if cfg.sae.path else [f"{self.exp}/sae/metrics.json"]

    def label_variant(self, cfg: Config) -> str | None:
        """The name of the label cache `cfg` reads under <experiment>/concepts/ (None: elsewhere,
        a `concept.cache_dir` the DAG does not make)."""
        root = self.base.experiment_dir / "concepts"
        if not cfg.concept_dir.is_relative_to(root):
            return None
        rel = cfg.concept_dir.relative_to(root)
        return str(rel) if len(rel.parts) == 1 else None

    def label_inputs(self, cfg: Config) -> list[str]:
        variant = self.label_variant(cfg)
        if variant is None:  # a cache made elsewhere: it must exist
            return [str(cfg.concept_dir / "manifest.json")]
        return [f"{self.exp}/concepts/{variant}/manifest.json"]

    def sae_fingerprint(self) -> str:
        return fingerprint(self.base, SAE_KEYS)

    def extract_inputs(self, variant: str) -> list[str]:
        """Labels are extracted from the data with the teacher and the SAE."""
        cfg = self.config(self.label_specs[variant].name)
        return [self.data_manifest()] + self.teacher_inputs(cfg) + self.sae_inputs(cfg)

    def extract_overrides(self, variant: str) -> str:
        return _quote(self.label_specs[variant].overrides)

    def labels_fingerprint(self, variant: str) -> str:
        return fingerprint(self.config(self.label_specs[variant].name), LABEL_KEYS)

    # ---- reports ----

    def report_inputs(self) -> list[str]:
        files = [f"{self.exp}/runs/{name}/final_metrics.json" for name in self.runs]
        if self.base.dag.evaluate:
            files += [f"{self.exp}/runs/{name}/eval_summary.json" for name in self.runs]
        return files

    def report_outputs(self) -> list[str]:
        tables = [f"{self.exp}/tables/{t}.{ext}" for t in TABLES for ext in ("md", "tex", "csv")]
        scales = sorted({r.scale or "base" for r in self.runs.values()})
        plots = [f"{self.exp}/plots/{kind}_{s}.png" for kind in ("heldout_loss", "downstream") for s in scales]
        return tables + plots

    # ---- sweep ----

    def sweep_config(self) -> Config:
        return load_config(self.config_path, [f"method={SWEEP_METHOD}"])

    def sweep_inputs(self) -> list[str]:
        """Data, teacher and SAE; the base label cache when the DAG builds it (otherwise the sweep
        extracts the labels its trials need itself)."""
        cfg = self.sweep_config()
        variant = self.label_variant(cfg)
        labels = [f"{self.exp}/concepts/{variant}/manifest.json"] if variant in self.label_specs else []
        return [self.data_manifest()] + self.teacher_inputs(cfg) + self.sae_inputs(cfg) + labels

    def sweep_output(self) -> str:
        return f"{self.exp}/sweeps/{study_name(self.sweep_config())}/summary.json"

    def sweep_workers(self) -> int:
        return max(1, self.base.sweep.workers)

    def sweep_threads(self, threads: int) -> int:
        """OMP threads of each sweep worker: the job's threads shared among the workers."""
        return max(1, threads // self.sweep_workers())


def _quote(overrides) -> str:
    return " ".join(f"'{o}'" for o in overrides)
