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

import torch

from cocomix.cluster import NODE_KEYS, Node, node_from
from cocomix.config import Config, ConfigError, fingerprint, load_config, split_batch
from cocomix.device import estimate_training_memory
from cocomix.methods import get_method, run_fingerprint
from cocomix.plan import ABLATION_METHOD, RunSpec, plan_runs, teacher_spec
from cocomix.sweep import study_key, study_name
from cocomix.tune import method_config, study_config

# Every job runs offline: a wrong local path must fail at once, not retry the hub for minutes.
OFFLINE = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
# The CLI, run by the interpreter that runs Snakemake (the project's environment), whatever PATH says.
COCOMIX = f"{OFFLINE} {sys.executable} -m cocomix.cli"

# What the SAE and a label cache are computed from (their rules rerun when these change).
SAE_KEYS = ("data", "tokenizer", "teacher", "sae", "train.block_size")
LABEL_KEYS = ("data", "tokenizer", "teacher", "sae", "concept", "train.block_size")
TABLES = ("main", "sample_efficiency", "ablations", "diagnostics", "teacher", "sae", "compute", "paired_downstream", "tuning",
          "seed_variance")
# A compute-matched arm's FLOPs for time limits and `cocomix plan`, as a multiple of its method's student
# FLOPs: its budget is set at launch (cocomix/compute.py); online labels cost about 3-3.5x (flops.py).
ARM_FLOPS_BOUND = 4.0
# SLURM time limits of training jobs (Dag.runtime_minutes): the run's FLOPs at this fraction of an
# H100/H200's dense bf16 peak, times RUNTIME_SAFETY, plus RUNTIME_EXTRA_MIN for start-up, evaluations
# and checkpoints, at most RUNTIME_MAX_MIN (a job stopped at its limit is resubmitted and resumes).
RUNTIME_MFU, RUNTIME_PEAK_FLOPS, RUNTIME_SAFETY, RUNTIME_EXTRA_MIN, RUNTIME_MAX_MIN = 0.25, 989e12, 2.0, 30, 2880


class Dag:
    """The experiment of one config file, as the rules see it."""

    teacher_priority = 2  # Snakemake priority of the teacher's job and of train_sae and extract_concepts

    def __init__(self, config_path: str | Path, train_gpus: int = 1):
        """`train_gpus`: the GPUs (DDP processes) the profile gives each training job; every planned
        run's global batch must split over them, checked here, before any job starts."""
        self.config_path = str(config_path)
        self.train_gpus = train_gpus
        self.base = load_config(self.config_path)
        self.runs: dict[str, RunSpec] = {r.name: r for r in plan_runs(self.config_path)}
        self.teacher: RunSpec | None = teacher_spec(self.config_path)
        self.exp = str(self.base.experiment_dir)
        self.cli = COCOMIX
        self.offline = OFFLINE
        self._configs: dict[str, Config] = {}
        self._flops: dict[str, float] = {}
        self._params: dict[str, tuple[int, int]] = {}  # (parameters, padded vocabulary) of each run's model
        # One representative run per label cache: its overrides tell extract-concepts how to score.
        self.label_specs: dict[str, RunSpec] = {}
        for name, spec in self.runs.items():
            cfg = self.config(name)
            variant = self.label_variant(cfg)
            if variant is not None and "labels" in self.artifacts(cfg):
                self.label_specs.setdefault(variant, spec)
        self.check_launch()

    def check_launch(self) -> None:
        """Every training job (the teacher's too) can split its global batch over `train_gpus`."""
        names = (["teacher"] if self.teacher else []) + list(self.runs)
        for name in names:
            t = self.config(name).train
            try:
                split_batch(t.global_batch_size, t.micro_batch_size, self.train_gpus)
            except ConfigError as e:
                raise ConfigError(f"run {name}: {e}, the GPUs of each training job (the profile's node_gpus x "
                                  f"train:nodes, or train:gpu); set train.global_batch_size to a multiple of "
                                  f"{self.train_gpus} or lower train:gpu") from None

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
        DAG makes them: a label cache stands for the teacher and SAE it is extracted with. With
        `dag.tuned`, its method's tuning result; a compute-matched arm, the runs its budget is read from."""
        cfg = self.config(run)
        files = [self.data_manifest()] + self.artifact_inputs(cfg, self.artifacts(cfg))
        if self.tuned_method(run):
            files.append(self.tune_output(self.tuned_method(run)))
        return files + self.matched_inputs(run)

    # ---- equal tuning (cocomix/tune.py) and compute-matched arms (cocomix/compute.py) ----

    def tuned_method(self, run: str) -> str | None:
        """The method whose tuned values `run` trains with (`dag.tuned`): its own; CoCoMix's for an
        ablation; NTP's for a compute-matched arm; None when not tuned."""
        if not self.base.dag.tuned or run == "teacher":
            return None
        spec = self.spec(run)
        return ABLATION_METHOD if spec.ablation else spec.method  # ablations: CoCoMix's, under their own overrides

    def tune_output(self, method: str) -> str:
        return f"{self.exp}/tuning/{method}/best.json"

    def tune_inputs(self, method: str) -> list[str]:
        """What the method's trials read: the data, and its teacher, SAE or label cache."""
        cfg = method_config(self.config_path, method)
        return [self.data_manifest()] + self.artifact_inputs(cfg, self.artifacts(cfg))

    def tune_fingerprint(self, method: str) -> str:
        """The study's key (cocomix/sweep.py `study_key`): its base config, budget and search space."""
        cfg = study_config(self.config_path, method)
        return study_key(cfg, cfg.sweep.space)

    def tuned_methods(self) -> list[str]:
        return list(self.base.dag.methods) if self.base.dag.tuned else []

    def one_off_readers(self) -> list[str]:
        """Runs that read a one-off item (teacher, SAE, labels): those an amortised total is shared by."""
        return [n for n, r in self.runs.items() if r.arm is None and self.artifacts(self.config(n))]

    def matched_inputs(self, run: str) -> list[str]:
        """A compute-matched arm waits for the run it matches, and an amortised arm for every run that
        shares its one-off items (their number divides them)."""
        spec = self.spec(run)
        if spec.arm is None:
            return []
        final = f"{self.exp}/runs/{{}}/final_metrics.json"
        readers = self.one_off_readers() if spec.arm.endswith("+") else []
        return [final.format(spec.matched_run)] + [final.format(n) for n in readers if n != spec.matched_run]

    def run_flags(self, run: str) -> str:
        """`cocomix train` flags of one run: `--tuned` (dag.tuned) and an arm's `--match-flops`, each with a
        leading space (the train rule writes them right after TRAIN_FLAGS); "" for a plain run."""
        flags = []
        if self.tuned_method(run):
            flags.append(f"--tuned {self.tune_output(self.tuned_method(run))}")
        spec = self.spec(run)
        if spec.arm is not None:
            inputs = self.matched_inputs(run)
            flags.append(f"--match-flops {inputs[0]}")
            if spec.arm.endswith("+"):
                flags.append("--amortise-over " + ",".join(inputs))
        return "".join(" " + f for f in flags)

    def artifact_inputs(self, cfg: Config, artifacts) -> list[str]:
        files = []
        if "teacher" in artifacts:
            files += self.teacher_inputs(cfg)
        if "sae" in artifacts:
            files += self.sae_inputs(cfg)
        if "labels" in artifacts:
            files += self.label_inputs(cfg)
        return files

    @property
    def eval_in_train(self) -> bool:
        """Each training job evaluates its run's checkpoints itself (`dag.evaluate_in_train`): its outputs
        are then final_metrics.json and eval_summary.json, and there is no `evaluate` rule."""
        return self.base.dag.evaluate and self.base.dag.evaluate_in_train

    def train_outputs(self) -> list[str]:
        """What the `train` rule writes per run (a `{run}` wildcard pattern)."""
        files = [f"{self.exp}/runs/{{run}}/final_metrics.json"]
        return files + ([f"{self.exp}/runs/{{run}}/eval_summary.json"] if self.eval_in_train else [])

    def train_flags(self) -> str:
        """`cocomix train` flags of every training job: `--eval` when it evaluates its own checkpoints."""
        return "--eval" if self.eval_in_train else ""

    def priority(self, run: str) -> int:
        """Snakemake priority of a training job: the teacher first (the SAE, the labels and every run that
        reads them wait for it), then the runs that read concept labels (the last to become ready), then
        the rest; on a few cores this keeps every core busy to the end instead of leaving the teacher's
        chain for last."""
        if run == "teacher":
            return self.teacher_priority
        return 1 if "labels" in self.artifacts(self.config(run)) else 0

    @staticmethod
    def launcher(gpus: int, nodes: int = 1, cpus_per_node: int | None = None) -> str:
        """What runs a `cocomix` command: the CLI; with several GPUs in one job, DDP through
        cocomix.launch (torchrun on one node; on several, srun starts one torchrun agent per node with
        `cpus_per_node` CPUs, meeting at a rendezvous: cocomix/cluster.py)."""
        if nodes > 1:
            cpus = f" --cpus-per-node {cpus_per_node}" if cpus_per_node else ""
            return f"{sys.executable} -m cocomix.launch --gpus {gpus} --nodes {nodes}{cpus}"
        if gpus > 1:
            return f"{sys.executable} -m cocomix.launch --gpus {gpus}"
        return f"{sys.executable} -m cocomix.cli"

    def training_flops(self, run: str) -> float:
        """The student's training FLOPs over the run's budget (the model built on the meta device: no
        memory, no weights; `CocomixForCausalLM.flops_per_token`). A KD teacher's forward and online
        labels are not counted (GPT-2's forward is about half the 69M student's). Built once per run."""
        if run in self._flops:
            return self._flops[run]
        cfg = self.teacher_config() if run == "teacher" else self.config(run)
        vocab = cfg.model.vocab_size or (50257 if cfg.tokenizer.path else cfg.tokenizer.vocab_size)
        with torch.device("meta"):
            model = get_method(cfg.method).build_model(cfg, vocab, 0)
        self._flops[run] = float(model.flops_per_token(cfg.train.block_size) * cfg.train.tokens)
        spec = self.spec(run) if run != "teacher" else None
        if spec is not None and spec.arm is not None:  # its budget is set at launch: bound it for time limits
            self._flops[run] = ARM_FLOPS_BOUND * self.training_flops(spec.matched_run)
        self._params[run] = (sum(p.numel() for p in model.parameters()), model.config.vocab_size)
        return self._flops[run]

    def memory_per_gpu(self, run: str) -> int:
        """A lower bound of one training process's memory (bytes; `device.estimate_training_memory`):
        weights, gradients and AdamW state (divided over the job's GPUs under train.parallel=fsdp) and
        one micro-batch's activations (fewer with train.activation_checkpointing)."""
        self.training_flops(run)  # builds the meta model once
        cfg = self.teacher_config() if run == "teacher" else self.config(run)
        t, m = cfg.train, cfg.model
        params, vocab = self._params[run]
        gpus = self.train_gpus
        micro, _ = split_batch(t.global_batch_size, t.micro_batch_size, gpus)
        est = estimate_training_memory(params, m.n_embd, m.n_layer, vocab, t.block_size, t.precision != "fp32",
                                       shards=gpus if t.parallel == "fsdp" else 1, recompute=t.activation_checkpointing)
        return est.need(micro)

    def gpu_hours(self, run: str, mfu: float = RUNTIME_MFU) -> float:
        """H100/H200-hours of a run's training at `mfu` of the dense bf16 peak (RUNTIME_PEAK_FLOPS)."""
        return self.training_flops(run) / (RUNTIME_PEAK_FLOPS * mfu) / 3600

    def runtime_minutes(self, run: str) -> int:
        """The SLURM time limit of a training job, from its FLOPs over the profile's GPUs per job; see
        RUNTIME_* above (the safety factor covers what `training_flops` leaves out)."""
        seconds = self.gpu_hours(run) * 3600 / self.train_gpus * RUNTIME_SAFETY
        return int(min(RUNTIME_MAX_MIN, RUNTIME_EXTRA_MIN + seconds / 60))

    def teacher_config(self) -> Config:
        return self.teacher.config(self.config_path)

    @staticmethod
    def gpu_job_threads(cores: int, gpus: int | None) -> int:
        """CPU threads of each GPU job: the cores shared among the GPUs (`--resources gpu=N`), so N
        GPU jobs run at once. With no GPU count (a CPU machine) half the cores, so two jobs run side by
        side: a small job spends seconds importing torch and writing files with its other cores idle
        (the CI DAG on 2 cores: 268 s against 346 s one job at a time)."""
        return max(1, cores // gpus) if gpus else max(1, cores // 2)

    # ---- data, teacher, SAE, labels ----

    def data_manifest(self) -> str:
        """The prepared data's manifest: <experiment>/data/, or `data.dir` (which `cocomix prepare-data`
        writes; before, the rule waited for <experiment>/data/ and failed on a `data.dir` elsewhere)."""
        return str(self.base.data_dir / "manifest.json")

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
        # The teacher and SAE tables read them where some run needs them (no teacher is trained for them)
        built = {f for name in self.runs for f in self.train_inputs(name)}
        built |= {f for variant in self.label_specs for f in self.extract_inputs(variant)}
        files += [f for f in self.teacher_inputs() + self.sae_inputs() if f in built]
        if self.base.dag.evaluate:
            files += [f"{self.exp}/runs/{name}/eval_summary.json" for name in self.runs]
        return files + [self.tune_output(m) for m in self.tuned_methods()]

    def report_outputs(self) -> list[str]:
        tables = [f"{self.exp}/tables/{t}.{ext}" for t in TABLES for ext in ("md", "tex", "csv")]
        scales = sorted({r.scale or "base" for r in self.runs.values()})
        ablated = sorted({r.scale or "base" for r in self.runs.values() if r.ablation})
        plots = [f"{self.exp}/plots/{kind}_{s}" for kind in ("heldout_loss", "downstream", "diagnostics") for s in scales]
        plots += [f"{self.exp}/plots/{kind}_{s}_ablations" for kind in ("heldout_loss", "diagnostics") for s in ablated]
        return tables + [p + ext for p in plots for ext in (".png", ".pdf")]

    def report_entries(self) -> list[tuple[str, str | None]]:
        """Every report output with its category in `snakemake --report` (None: not shown there;
        the Markdown and LaTeX tables repeat the CSV ones)."""
        return [(p, "Plots" if p.endswith(".png") else "Tables" if p.endswith(".csv") else None)  # PDFs repeat the PNGs
                for p in self.report_outputs()]

    # ---- sweep ----

    def sweep_config(self) -> Config:
        return load_config(self.config_path, [f"method={self.base.sweep.method}"])  # the trials' method (cocomix/sweep.py)

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


DEFAULT_CONFIG = "config/tiny.yaml"


def config_path(workflow, config: dict) -> str:
    """The experiment config a Snakemake invocation names: `--config config=PATH`, or one
    `--configfile PATH` (Snakemake has merged that file's keys into `config`; the plan reads the
    file itself through the typed loader, as every `cocomix` command does), else the embedded
    default. Both at once, or several config files, stop planning in one line."""
    files = [str(f) for f in (workflow.overwrite_configfiles or [])]
    given = config.get("config")
    if len(files) > 1:
        raise ConfigError(f"--configfile: give one experiment config, got {len(files)} ({' '.join(files)}); "
                          "or use --config config=PATH")
    if files and given is not None:
        raise ConfigError(f"--configfile {files[0]} and --config config={given} name two experiment configs; "
                          "give one of them")
    if files:
        path = Path(files[0])
        try:  # as the user gave it when it lies under the working directory (shorter job lines)
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return str(given) if given is not None else DEFAULT_CONFIG


def requested(workflow, rule: str | None, resource: str):
    """A resource the Snakemake profile or command line sets: for `rule` (set-resources) or for the
    whole workflow (--resources) when `rule` is None. None when not set."""
    settings = workflow.resource_settings
    found = settings.overwrite_resources.get(rule, {}).get(resource) if rule else workflow.global_resources.get(resource)
    value = _int(found)
    return value if isinstance(value, int) else None


def _int(value):
    if hasattr(value, "is_evaluable"):  # a Snakemake Resource: a function of the job has no value yet
        value = None if value.is_evaluable() else value.value
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def declared_node(workflow) -> Node | None:
    """The node the profile declares in its default resources (cocomix/cluster.py), or None."""
    defaults = workflow.resource_settings.default_resources
    return node_from({k: _int(defaults.get(k)) for k in NODE_KEYS} if defaults is not None else {})


def rule_requests(workflow) -> dict[str, dict[str, object]]:
    """Each rule's integer resources as its jobs will ask for them: the rule's own, then the profile's
    default resources where the rule sets none, then its set-resources. Resources given as functions
    of a job (runtime, a sweep's GPUs) count where the rule's resources are integers only."""
    defaults = workflow.resource_settings.default_resources
    out: dict[str, dict[str, object]] = {}
    for rule in workflow.rules:
        res = {k: _int(defaults.get(k)) for k in ("gpu", "cpus_per_task", "mem_mb", "nodes", "tasks_per_node")
               if defaults is not None and defaults.get(k) is not None}
        res.update({k: _int(v) for k, v in dict(rule.resources).items() if not k.startswith("_")})
        res.update({k: _int(v) for k, v in workflow.resource_settings.overwrite_resources.get(rule.name, {}).items()})
        out[rule.name] = {k: v for k, v in res.items() if isinstance(v, int) and not isinstance(v, bool)}
    return out


def _quote(overrides) -> str:
    return " ".join(f"'{o}'" for o in overrides)
