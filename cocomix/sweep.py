"""Optuna sweeps over CoCoMix's design choices: where concepts enter (concept.insert_layer) and how
many stay active (concept.k), optionally concept.lam, concept.k_attr or any other config key.

    cocomix sweep --config config/tiny.yaml                     # sweep.workers local workers
    cocomix sweep --config config/tiny.yaml --workers 0         # create the study / write outputs only
    cocomix sweep --config config/tiny.yaml --join              # one more worker (e.g. a SLURM job)

A trial is an ordinary training run of `sweep.method` (CoCoMix; `cocomix tune` runs one study per method:
cocomix/tune.py) with the same trainer, data order and seed as every other run, of `sweep.tokens` tokens; its held-out losses are reported to Optuna as it trains (step = tokens seen), a pruner
stops the bad ones early, and the objective is the final held-out loss.

Safety with parallel workers (shared/notes/ecosystem-facts.md, section 6): the study is created once, under a
file lock, before any worker starts; workers only load it. Each worker records a heartbeat; a trial whose worker
died (killed, preempted) goes stale after `sweep.grace_s`, is marked FAIL and queued again with the same
parameters and run folder, so it resumes from its checkpoint; a rerun continues the study, which refuses
another base config or search space. A stop signal (SIGUSR1, SIGTERM) hands the running trials back the same way, checkpointed.

Tracking (`tracking.backend`): the sweep is a tracked run; every trial is a run nested under it
(`tracking.parent_run_id`) with its parameters and held-out curve, tagged with its Optuna state.

Outputs in <experiment>/sweeps/<study>/: trials.{csv,md}, best_config.yaml (the base config with the best
parameters and the base train.tokens), importance.png, contour.png, logs/worker-<i>.log, trials/trial-<n>/.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cocomix.config import RUN_SECTIONS, Config, ConfigError, SweepParam, _set_dotted, config_from_dict, fingerprint
from cocomix.data import DataError
from cocomix.files import RunInUse, atomic_write_bytes, atomic_write_json, atomic_write_text, lock_run
from cocomix.tracking import open_tracker, run_id_of

# Keys every sweep searches (the two design choices); the rest of `sweep.space` is optional.
REQUIRED_KEYS = ("concept.insert_layer", "concept.k")


class SweepError(RuntimeError):
    """A sweep that cannot run or produced no result; reported as one line by the CLI."""


class TrialFailed(Exception):
    """A trial failed on its own (NaN, out of memory, an impossible combination): FAIL, and on to the next."""


class TrialTakenElsewhere(BaseException):
    """Another worker already runs this very trial: Optuna's SQLite storage can hand one queued trial (a
    killed worker's, queued again) to two workers at once; the one that finds its run folder locked leaves
    it. A BaseException, so Optuna records nothing (a FAIL would refuse the other's result)."""


# ---- Configuration: names, storage, search space, per-trial configs ----


def study_name(cfg: Config) -> str:
    return cfg.sweep.study or f"{cfg.experiment}-sweep"


def sweep_dir(cfg: Config) -> Path:
    return cfg.experiment_dir / "sweeps" / study_name(cfg)


def storage_url(cfg: Config) -> str:
    if cfg.sweep.storage:
        return cfg.sweep.storage
    return f"sqlite:///{(cfg.experiment_dir / 'sweeps' / 'optuna.db').resolve()}"


def search_space(cfg: Config) -> dict[str, SweepParam]:
    """`sweep.space` plus default ranges for the required keys, each checked against the config."""
    space, cocomix = dict(cfg.sweep.space), cfg.sweep.method == "cocomix"  # the required keys are CoCoMix's
    if cocomix and "concept.insert_layer" not in space:
        space["concept.insert_layer"] = SweepParam("int", 1, max(1, cfg.model.n_layer - 1))
    if cocomix and "concept.k" not in space:
        k = cfg.concept.k
        space["concept.k"] = SweepParam("int", max(1, k // 4), min(cfg.sae.n_latents, 4 * k), log=True)
    tree = cfg.to_dict()
    for key, p in space.items():
        where = f"config key 'sweep.space.{key}'"
        node = tree
        for part in key.split("."):  # the key must name a setting (values are the trials' business:
            if not isinstance(node, dict) or part not in node:  # an impossible one is a failed trial)
                raise ConfigError(f"{where}: '{key}' is not a config key")
            node = node[part]
        if isinstance(node, dict):
            raise ConfigError(f"{where}: '{key}' is a section, not a setting")
        if p.type == "categorical":
            if not p.choices:
                raise ConfigError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
        else:
            if p.low is None or p.high is None or p.low > p.high:
                raise ConfigError(f"{where}: an {p.type} parameter needs low <= high, got low={p.low} high={p.high}")
            if p.log and p.low <= 0:
                raise ConfigError(f"{where}: a log-scale range needs low > 0, got {p.low}")
            if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
                raise ConfigError(f"{where}: an int parameter needs integer bounds, got {p.low}..{p.high}")
    if "concept.insert_layer" in space and space["concept.insert_layer"].type == "int":
        p = space["concept.insert_layer"]
        if p.low < 1 or p.high > cfg.model.n_layer - 1:
            raise ConfigError(f"config key 'sweep.space.concept.insert_layer': must lie in 1..{cfg.model.n_layer - 1} "
                              f"(model.n_layer={cfg.model.n_layer}), got {p.low}..{p.high}")
    return space


def budget(cfg: Config) -> int:
    return cfg.sweep.tokens or cfg.train.tokens


def _flat_tree(cfg: Config) -> dict[str, Any]:
    """The resolved config as a tree that reloads to itself: scale and method tables are already
    applied, so they are dropped (reloading would apply them again, over the swept values)."""
    tree = copy.deepcopy(cfg.to_dict())
    tree.update(scale=None, scales={}, method_overrides={})
    return tree


def trial_config(cfg: Config, params: dict[str, Any], number: int, run_dir: str | None = None,
                 parent_run_id: str | None = None) -> Config:
    """The run of one trial (method `sweep.method`): the base config, the trial's parameters, the sweep's budget."""
    tree = _flat_tree(cfg)
    tree["method"] = cfg.sweep.method
    tree["train"]["tokens"] = budget(cfg)
    for key, value in params.items():
        _set_dotted(tree, key, value)
    path = Path(run_dir) if run_dir else sweep_dir(cfg) / "trials" / f"trial-{number:03d}"
    tree["runs_dir"], tree["run_name"] = str(path.parent), path.name
    tree["tracking"]["parent_run_id"] = parent_run_id
    tree["tracking"]["tags"] = {"optuna.study": study_name(cfg), "optuna.trial": str(number)}
    return config_from_dict(tree)


def best_config_tree(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    """What best_config.yaml holds: the base config (its own train.tokens) with the best parameters."""
    tree = _flat_tree(cfg)
    tree["method"] = cfg.sweep.method
    for key, value in params.items():
        _set_dotted(tree, key, value)
    tree["run_name"] = f"{cfg.sweep.method}-best-{study_name(cfg)}"
    tree["runs_dir"] = None
    config_from_dict(tree)  # must load as it is
    return tree


def study_key(cfg: Config, space: dict[str, SweepParam]) -> str:
    """What a study's trials must share to be comparable: every config section a trial's run reads
    (minus the searched keys and where things are stored), the budget and the search space. `method`
    is left out: the base config may name any method, every trial is `sweep.method`'s."""
    from cocomix.methods import get_method  # lazy: torch/transformers; the Snakefile imports sweep

    sections = [k for k in RUN_SECTIONS + get_method(cfg.sweep.method).reads if k != "method"]
    extra = {"budget": budget(cfg), "space": {k: vars(v) for k, v in sorted(space.items())}}
    if cfg.sweep.method != "cocomix":  # (a CoCoMix study's key is as it was before sweep.method existed)
        extra["method"] = cfg.sweep.method
    return fingerprint(cfg, sections, drop=(*space, "train.tokens"), extra=extra)


# ---- Optuna objects ----


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return optuna


LOCK_WAIT_S = 30.0  # how long a sqlite storage waits for another process's write before it gives up


@contextmanager
def storage_errors(cfg: Config):
    """The storage's failures as one line naming it (not a database, locked past LOCK_WAIT_S, no driver, ...)."""
    import sqlalchemy.exc  # lazy: optuna's own dependency, only for a sweep

    url = storage_url(cfg)
    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as e:
        cause = str(getattr(e, "orig", None) or e).splitlines()[0][:200]
        if "locked" in cause:
            raise SweepError(f"sweep.storage '{url}': database is locked by another process after {LOCK_WAIT_S:g} s; "
                             "let it finish or stop it (a killed worker's lock goes with it)") from None
        if "not a database" in cause:
            raise SweepError(f"sweep.storage '{url}': file is not a database (damaged, or not Optuna's); move it "
                             "away to start a new study, or point sweep.storage at the right one") from None
        raise SweepError(f"sweep.storage '{url}': {type(e).__name__}: {cause}") from None


class RetryOnce:
    """Queue a stale trial again once, however many workers fail it: on SQLite two workers failing it at
    once both succeed (it reads the state before either writes; servers lock the row), and Optuna's
    callback queued a retry each: two trials, one run folder. Under the file lock it is skipped."""

    def __init__(self, cfg: Config, retry) -> None:
        self.cfg, self.retry = cfg, retry

    def __call__(self, study, trial) -> None:
        with _storage_lock(self.cfg):
            if any(trial.number in t.system_attrs.get("retry_history", ()) for t in study.get_trials(deepcopy=False)):
                return
            self.retry(study, trial)


def open_storage(cfg: Config):
    """RDB storage with heartbeats: a trial whose worker died is failed and queued again."""
    optuna = _quiet_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(cfg)
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with storage_errors(cfg):
            return RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": LOCK_WAIT_S}} if sqlite else None,
                heartbeat_interval=cfg.sweep.heartbeat_s,
                grace_period=cfg.sweep.grace_s,
                heartbeat_stale_trial_callback=RetryOnce(cfg, RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)),
            )
    except ImportError as e:  # optuna: "Failed to import DB access module for the specified storage URL"
        raise SweepError(f"sweep.storage '{url}': the database driver for it is not installed (e.g. pip install "
                         f"psycopg2-binary for postgresql://, pymysql for mysql+pymysql://): {e}") from None
    except (optuna.exceptions.StorageInternalError, ValueError) as e:
        raise SweepError(f"sweep.storage '{url}': cannot open ({str(e).splitlines()[0]})") from None


def make_sampler(cfg: Config, worker_index: int):
    optuna = _quiet_optuna()
    seed = cfg.sweep.seed + worker_index  # workers sharing a seed would propose the same points
    if cfg.sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna 5 defaults: multivariate TPE with constant_liar (running trials count as bad), which is
    # what parallel workers want.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sweep.n_startup_trials)


def make_pruner(cfg: Config):
    optuna = _quiet_optuna()
    if cfg.sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.pruner_startup_trials, n_warmup_steps=0)
    if cfg.sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.eval.every_tokens, max_resource=budget(cfg))
    return optuna.pruners.NopPruner()


@contextmanager
def _storage_lock(cfg: Config):
    """Serialise study creation on one machine (sqlite); remote databases need no file lock."""
    url = storage_url(cfg)
    if not url.startswith("sqlite:///"):
        yield
        return
    lock = Path(url[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_study(cfg: Config):
    """Create the study (once; and the sweep's tracked run, its id kept in the study) or check its config."""
    optuna = _quiet_optuna()
    space = search_space(cfg)
    key = study_key(cfg, space)
    with _storage_lock(cfg):
        storage = open_storage(cfg)
        study = optuna.create_study(study_name=study_name(cfg), storage=storage, direction="minimize",
                                    load_if_exists=True)
        existing = study.user_attrs.get("key")
        if existing is None:
            study.set_metric_names(["held-out loss (nats)"])  # optuna-dashboard's axis (not "Objective 0")
            study.set_user_attr("key", key)
            study.set_user_attr("space", {k: vars(v) for k, v in space.items()})
            for params in cfg.sweep.enqueue:
                unknown = set(params) - set(space)
                if unknown:
                    raise ConfigError(f"config key 'sweep.enqueue': {sorted(unknown)} are not in sweep.space ({sorted(space)})")
                study.enqueue_trial(params)
        elif existing != key:
            raise SweepError(
                f"study '{study.study_name}' in {storage_url(cfg)} was created with another base config, budget or "
                f"search space (key {existing}, now {key}); set sweep.study to a new name to start a new study"
            )
        if PARENT not in study.user_attrs:
            parent = _create_parent_run(cfg, space)
            if parent is not None:  # None: no tracking, or its store is unreachable (warned); trials still run
                study.set_user_attr(PARENT, parent)
    return study


# ---- Tracking ----

PARENT = "parent_run_id"  # the study's user attribute: the sweep's own tracked run


def _parent_tracker(cfg: Config, **kw):
    """The sweep's own tracked run, kept in the sweep folder."""
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    tree = _flat_tree(cfg)
    tree.update(run_name=f"sweep-{study_name(cfg)}", runs_dir=str(folder.parent))
    return open_tracker(config_from_dict(tree), folder, source="cocomix sweep", **kw)


def _create_parent_run(cfg: Config, space: dict[str, SweepParam]) -> str | None:
    # Created (or found) like any run, with the config as params.
    tracker = _parent_tracker(cfg, tags={"sweep": study_name(cfg), "method": cfg.sweep.method, "role": "sweep"},
                              params={f"sweep.space.{k}": json.dumps(vars(v)) for k, v in space.items()})
    run_id = tracker.run_id if tracker.active else None
    tracker.close()
    return run_id


def _record_trial_run(tcfg: Config, trial, state: str) -> None:
    """Tag the trial's tracked run with its Optuna state, and keep the run id in the trial (`tcfg`:
    the trial's own config, with which a run that trained without its store is sent first)."""
    tracker = open_tracker(tcfg, tcfg.run_dir, create=False, resume_status=False)
    if tracker.run_id is not None:
        trial.set_user_attr(tracker.id_key, tracker.run_id)
        tracker.set_tags({"optuna.state": state, "optuna.trial": str(trial.number)})
    tracker.close()


# ---- Workers ----


def _suggest(trial, space: dict[str, SweepParam]) -> dict[str, Any]:
    params = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            params[key] = trial.suggest_float(key, float(p.low), float(p.high), log=p.log)
    return params


def _ensure_labels(cfg: Config) -> None:
    """The label cache a trial reads; a trial with another concept.k_attr (or scoring) extracts its
    own once, under a lock so that concurrent workers do not extract it twice."""
    from cocomix.methods import get_method  # lazy: torch/transformers; the Snakefile imports sweep

    if "labels" not in get_method(cfg.method).artifacts(cfg) or (cfg.concept_dir / "manifest.json").is_file():
        return
    from cocomix.concepts import extract_concepts  # lazy: as above

    cfg.concept_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.concept_dir.parent / f".{cfg.concept_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not (cfg.concept_dir / "manifest.json").is_file():
            print(f"extracting labels for {cfg.concept_dir.name} (first trial that needs them)", flush=True)
            extract_concepts(cfg, progress=False)


def _counts(study) -> dict[str, int]:
    """Trials by what they mean for the budget. A trial failed by its heartbeat (worker killed) is
    not counted: it has been queued again as a WAITING trial."""
    out = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting", "stale"), 0)
    for t in study.get_trials(deepcopy=False):
        name = {"FAIL": "failed" if "failure" in t.user_attrs else "stale"}.get(t.state.name, t.state.name.lower())
        if name in out:  # COMPLETE, PRUNED, RUNNING, WAITING, FAIL
            out[name] += 1
    return out


def _remaining(cfg: Config, study) -> int:
    c = _counts(study)
    return cfg.sweep.n_trials - (c["complete"] + c["pruned"] + c["failed"] + c["running"] + c["waiting"])


def objective_for(cfg: Config, space: dict[str, SweepParam], parent_run_id: str | None):
    import optuna
    import torch

    from cocomix.callbacks import Terminated  # lazy: torch/transformers; the Snakefile imports sweep
    from cocomix.trainer import EarlyStop, TrainingError, train  # lazy: as above

    total = budget(cfg)

    def objective(trial) -> float:
        params = _suggest(trial, space)
        # A retried trial (its worker died) inherits the run folder and resumes from its checkpoint.
        run_dir = trial.user_attrs.get("run_dir")
        tcfg = None

        def on_eval(tokens: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val/loss"], tokens)
            if tokens < total and trial.should_prune():
                raise EarlyStop()

        held = None
        try:
            tcfg = trial_config(cfg, params, trial.number, run_dir, parent_run_id)
            try:
                held = lock_run(tcfg.run_dir)  # the Trainer takes the same lock; held here, it is shared
            except RunInUse:
                print(f"trial {trial.number}: another worker runs it (its run folder is locked); left to it",
                      flush=True)
                raise TrialTakenElsewhere() from None
            trial.set_user_attr("run_dir", str(tcfg.run_dir))
            _ensure_labels(tcfg)
            final = train(tcfg, progress=False, on_eval=on_eval)
        except EarlyStop:
            _record_trial_run(tcfg, trial, "PRUNED")
            raise optuna.TrialPruned() from None
        except Terminated:  # a stop signal (preemption): the checkpoint is written; hand the trial back
            trial.study._storage.get_heartbeat_stale_trial_callback()(trial.study, trial.study.trials[trial.number])
            print(f"trial {trial.number}: stopped by a signal; queued again, it resumes from its checkpoint", flush=True)
            raise
        except (TrainingError, DataError, ConfigError, torch.OutOfMemoryError, MemoryError) as e:
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            trial.set_user_attr("failure", message[:500])
            if tcfg is not None:  # else the trial's config itself was impossible: no run was started
                _record_trial_run(tcfg, trial, "FAIL")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"trial {trial.number} failed: {message}", flush=True)
            raise TrialFailed(message) from None
        finally:
            if held is not None:
                held.close()
        trial.set_user_attr("tokens", final["tokens_seen"])
        _record_trial_run(tcfg, trial, "COMPLETE")
        print(f"trial {trial.number} {params}: val/loss {final['val/loss']:.4f}", flush=True)
        return final["val/loss"]

    return objective


def run_worker(cfg: Config, worker_index: int = 0) -> None:
    """Join the study and run trials until it holds `sweep.n_trials` (and none is queued)."""
    optuna = _quiet_optuna()
    from optuna.storages import fail_stale_trials

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("a sweep worker trains single-process trials; start more workers instead of torchrun")
    with storage_errors(cfg):
        _run_worker(cfg, worker_index, optuna, fail_stale_trials)


def _run_worker(cfg: Config, worker_index: int, optuna, fail_stale_trials) -> None:
    space = search_space(cfg)
    storage = open_storage(cfg)
    try:
        study = optuna.load_study(study_name=study_name(cfg), storage=storage,
                                  sampler=make_sampler(cfg, worker_index), pruner=make_pruner(cfg))
    except KeyError:
        raise SweepError(f"no study '{study_name(cfg)}' in {storage_url(cfg)}: create it first with "
                         f"`cocomix sweep --workers 0` (workers only join)") from None
    if study.user_attrs.get("key") != study_key(cfg, space):
        raise SweepError(f"study '{study_name(cfg)}' was created with another base config, budget or search space")
    fail_stale_trials(study)  # trials of killed workers: failed and queued again

    def stop_when_full(study, _trial) -> None:
        if _remaining(cfg, study) <= 0 and _counts(study)["waiting"] == 0:
            study.stop()

    objective = objective_for(cfg, space, study.user_attrs.get(PARENT))
    while _remaining(cfg, study) > 0 or _counts(study)["waiting"] > 0:
        try:
            study.optimize(objective, callbacks=[stop_when_full], catch=(TrialFailed,), gc_after_trial=True)
            return
        except TrialTakenElsewhere:
            continue  # that trial is the other worker's; ask for the next one


def echo_trials(logs: Path, seen: dict[Path, int]) -> None:
    """Print the workers' new "trial N ..." lines (a finished or failed trial each) from their logs."""
    for log in sorted(logs.glob("worker-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        new, seen[log] = [f"sweep: {x}" for x in lines[seen.get(log, 0):] if x.startswith("trial ")], len(lines)
        if new:
            print("\n".join(new), flush=True)


def launch_workers(cfg: Config, config_path: Path, n: int) -> None:
    """Start `n` local workers on the study (one process each) and wait for them."""
    logs = sweep_dir(cfg) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs, seen = [], {p: len(p.read_text(errors="replace").splitlines()) for p in logs.glob("worker-*.log")}
    # SLURM's SIGUSR1 reaches every process: the workers checkpoint and hand their trials back; we wait.
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for i in range(n):
        log = open(logs / f"worker-{i}.log", "a")
        cmd = [sys.executable, "-m", "cocomix.cli", "sweep", "--join", "--worker-index", str(i), "--config", str(config_path)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        if n > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the CPU cores between workers
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        procs.append((i, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed, stopped = [], []
    while any(proc.poll() is None for _, proc, _ in procs):  # one line here per trial a worker finishes
        echo_trials(logs, seen)
        time.sleep(2)
    echo_trials(logs, seen)
    for i, proc, log in procs:
        if proc.wait() != 0:
            stop = proc.returncode - 128 in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
            (stopped if stop else failed).append(f"worker {i} (exit {proc.returncode}, log {logs / f'worker-{i}.log'})")
        log.close()
    signal.signal(signal.SIGUSR1, previous)
    if failed:
        raise SweepError("sweep worker failed: " + "; ".join(failed + stopped))
    if stopped:
        raise SweepError("sweep stopped by a signal: " + "; ".join(stopped) + "; their trials are queued again and "
                         "resume from their checkpoints: rerun the same command to continue")


# ---- Outputs ----


def trials_table(study) -> tuple[list[str], list[list[str]]]:
    space_keys = sorted({k for t in study.trials for k in t.params})
    header = ["trial", "state", "held-out loss", "last reported at (tokens)", *space_keys, "retry of",
              "tracked run", "note"]
    rows = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        value = t.value if t.value is not None else (t.intermediate_values[steps[-1]] if steps else None)
        retry = t.system_attrs.get("failed_trial")
        note = t.user_attrs.get("failure", "worker died; queued again" if t.state.name == "FAIL" else "")
        rows.append([
            str(t.number), t.state.name, "" if value is None or not math.isfinite(value) else f"{value:.4f}",
            str(steps[-1]) if steps else "", *[str(t.params.get(k, "")) for k in space_keys],
            "" if retry is None else str(retry), str(run_id_of(t.user_attrs) or ""), note,
        ])
    return header, rows


def _plots(study, out: Path) -> list[Path]:
    """Parameter importance and a contour of the two required keys, or of a study's first two searched
    keys when it has no CoCoMix keys (a `cocomix tune` study); needs >= 2 complete trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return []
    written = []
    keys = list(REQUIRED_KEYS) if set(REQUIRED_KEYS) <= set(complete[0].params) else list(complete[0].params)[:2]
    for name, draw in (
        ("importance.png", lambda: ovm.plot_param_importances(study)),
        ("contour.png", lambda: ovm.plot_contour(study, params=keys)),
    ):
        try:
            ax = draw()
        except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. every complete trial has equal params
            print(f"{name}: not drawn ({e})", flush=True)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(7, 5)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out / name, png.getvalue())
        written.append(out / name)
    return written


def write_outputs(cfg: Config, study) -> dict[str, Any]:
    """Trials table, best config and plots; logged to the sweep's tracked run, which ends FINISHED."""
    out = sweep_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = trials_table(study)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out / "trials.csv", buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write_text(out / "trials.md", "\n".join(md) + "\n")
    counts = _counts(study)
    summary: dict[str, Any] = {"study": study_name(cfg), "storage": storage_url(cfg), **counts,
                               "values": {str(t.number): t.value for t in study.trials if t.state.name == "COMPLETE"}}
    files = [out / "trials.csv", out / "trials.md"]
    if counts["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        tree = best_config_tree(cfg, best.params)
        head = (f"# Best of sweep '{study_name(cfg)}' (trial {best.number}, held-out loss {best.value:.4f} at "
                f"{budget(cfg):,} tokens).\n# Train it: cocomix train --config {out / 'best_config.yaml'}\n")
        atomic_write_text(out / "best_config.yaml", head + yaml.safe_dump(tree, sort_keys=False))
        files.append(out / "best_config.yaml")
    files += _plots(study, out)
    atomic_write_json(out / "summary.json", summary, indent=2, default=str)
    if study.user_attrs.get(PARENT):
        tracker = _parent_tracker(cfg, create=False, resume_status=False)
        metrics = {f"sweep/{k}": float(v) for k, v in counts.items()}
        if counts["complete"]:
            metrics["sweep/best_value"] = float(summary["best_value"])
            tracker.set_tags({"best_trial": str(summary["best_trial"])})
        tracker.log_metrics(metrics, step=0)
        for f in files:
            tracker.log_artifact(f)
        tracker.finish("FINISHED")
    return summary


def sweep(cfg: Config, config_path: Path | None, workers: int) -> dict[str, Any]:
    """Create (or continue) the study, run `workers` local workers, write the outputs."""
    with storage_errors(cfg):
        return _sweep(cfg, workers)


def _sweep(cfg: Config, workers: int) -> dict[str, Any]:
    study = create_study(cfg)
    sweep_dir(cfg).mkdir(parents=True, exist_ok=True)
    if study.user_attrs.get(PARENT):
        _parent_tracker(cfg, create=False, resume_status=True).close()  # the sweep's run is running again
    if workers > 0:
        # Workers read the resolved config (identical to this one whatever file and overrides made it).
        resolved = sweep_dir(cfg) / "sweep_config.yaml"
        atomic_write_text(resolved, yaml.safe_dump(_flat_tree(cfg), sort_keys=False))
        try:
            launch_workers(cfg, resolved, workers)
        finally:
            summary = write_outputs(cfg, study)
    else:
        summary = write_outputs(cfg, study)
    if not summary["complete"] and _remaining(cfg, study) <= 0:
        raise SweepError(f"sweep '{study_name(cfg)}': no trial completed ({summary['failed']} failed, "
                         f"{summary['pruned']} pruned); see {sweep_dir(cfg) / 'trials.md'}")
    return summary
