"""Run tracking: one interface, `Tracker`, that every writer of a run record uses (training, the
SAE, evaluation, sweeps), and the backends behind it (`tracking.backend`):

    mlflow  an MLflow run (sqlite under results/ by default, or any tracking server)
    wandb   a Weights & Biases run (`pip install cocomix[wandb]`; WANDB_MODE=offline keeps it on
            disk under the run folder, `wandb sync` sends it later)
    none    nothing but the run folder's own files

Whatever the backend, the run folder's metrics.jsonl (cocomix/records.py) is the record the tables
read; a backend is where people compare runs in a UI. Every point is logged at step = tokens seen,
so curves of runs with different batch sizes, and later evaluations (`cocomix eval`), line up. `open_tracker(cfg, run_dir, ...)` picks the backend (the
interface: `Tracker`'s methods); nothing outside this module imports mlflow or wandb or names their tags.

Tracking degrades, it never blocks a run: an unreachable server is found by a short probe, MLflow's
HTTP retries are bounded, and any failed backend call turns tracking off for the run with one warning.
The run goes on with metrics.jsonl as its record and (MLflow) leaves `mlflow_pending.json`; `replay`
(on the next start, or `cocomix track-sync RUN_DIR`) sends what MLflow lacks, point by point.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from cocomix.config import Config
from cocomix.checkpoints import checkpoint_files, run_config
from cocomix.files import atomic_write_json, atomic_write_text, read_json
from cocomix.records import MetricsLog, RecordError, flatten, user_name

PENDING = "mlflow_pending.json"  # in a run folder: MLflow lacks some of this run's record
PROBE_TIMEOUT_S = 3.0
# MLflow's defaults retry a dead server for ~268 s (a cluster job would lose its allocation); users' win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(RuntimeError):
    """The tracking server is unreachable and `tracking.required` is true (one line)."""


class Unreachable(Exception):
    """The tracking store did not answer; the message says how."""


_warned: set[str] = set()  # URIs this process already warned about
_down: dict[str, tuple[str, float]] = {}  # URI -> (why, when): not tried again for RETRY_AFTER_S
RETRY_AFTER_S = 300.0


def tracking_uri(cfg: Config) -> str:
    """Explicit config > MLFLOW_TRACKING_URI > an embedded sqlite store under results_dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.results_dir).resolve() / 'mlflow.db'}"


def init_store(uri: str) -> None:
    """Create the MLflow schema once, under a file lock: processes creating a fresh sqlite store at once
    race in its migrations (shared/notes/ecosystem-facts.md section 5)."""
    import mlflow

    lock_path = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db.with_suffix(db.suffix + ".lock")
    if lock_path is None:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if isinstance(err, Unreachable):
        return text[0]
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def probe(uri: str) -> None:
    """Raise Unreachable unless an http(s) tracking server answers its /health within a few seconds
    (a dropped packet costs PROBE_TIMEOUT_S, a refused connection nothing). Other stores: no probe."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as resp:
            resp.read(64)
    except (OSError, urllib.error.URLError) as e:  # refused, timed out, DNS, HTTP error status
        cause = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
        if isinstance(cause, TimeoutError):
            raise Unreachable(f"no answer within {PROBE_TIMEOUT_S:g} s") from None
        raise Unreachable(_reason(cause)) from None


def degrade(cfg: Config, uri: str, err: BaseException | str, run_dir: Path | None = None) -> None:
    """An MLflow call failed: raise TrackingError if tracking is required, else warn once per URI and
    leave `mlflow_pending.json` in the run folder (what replay needs to send the run's record later)."""
    reason = err if isinstance(err, str) else _reason(err)
    _down.setdefault(uri, (reason, time.monotonic()))
    if cfg.tracking.required:
        raise TrackingError(f"tracking server {uri} unreachable ({reason}) and tracking.required is true")
    if run_dir is not None:
        mark_pending(run_dir, uri, reason)
    if uri not in _warned:
        _warned.add(uri)
        later = f"`cocomix track-sync {run_dir}`" if run_dir is not None else "a rerun"
        print(f"cocomix: warning: tracking server {uri} unreachable ({reason}); going on without MLflow, "
              f"metrics.jsonl is the record; its metrics reach MLflow on the next start or with {later}",
              file=sys.stderr, flush=True)


def mark_pending(run_dir: Path, uri: str, reason: str, tags: dict | None = None, params: dict | None = None,
                 standard: dict | None = None):
    path = Path(run_dir) / PENDING
    old = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {"uri": uri, "reason": reason, "since": old.get("since", time.strftime("%Y-%m-%d %H:%M:%S")),
                             "tags": tags if tags is not None else old.get("tags", {}),
                             "params": params if params is not None else old.get("params", {}),
                             "standard": standard if standard is not None else old.get("standard", {})})


def connect(cfg: Config, run_dir: Path | None = None, uri: str | None = None):
    """An MlflowClient for the run's store, or None (after `degrade`) when it cannot be reached."""
    uri = uri or tracking_uri(cfg)
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, v)
    # urllib3 prints a line per retry of a dead server; the one warning of `degrade` says it all.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if uri in _down and time.monotonic() - _down[uri][1] < RETRY_AFTER_S:
        degrade(cfg, uri, _down[uri][0], run_dir)
        return None
    _down.pop(uri, None)
    try:
        probe(uri)
        import mlflow

        init_store(uri)
        return mlflow.MlflowClient(uri)
    except Exception as e:  # Unreachable, or MLflow's own error for a store it cannot open
        degrade(cfg, uri, e, run_dir)
        return None


BACKENDS = ("mlflow", "wandb", "none")


def backend_of(cfg: Config) -> str:
    """The backend a config asks for: `tracking.backend`, or none when `tracking.enabled` is false."""
    return cfg.tracking.backend if cfg.tracking.enabled else "none"


def runs_heading(cfg: Config) -> str | None:
    """Whose run ids a report's run-id columns hold, when not MLflow's (their default heading)."""
    return "wandb" if backend_of(cfg) == "wandb" else None


def run_id_of(record: dict[str, Any]) -> str | None:
    """The tracked run id a final_metrics.json, metrics.json or eval.json records (any backend)."""
    return next((record[k] for k in (MLflowTracker.id_key, WandbTracker.id_key) if record.get(k)), None)


class Tracker:
    """A run's record: metrics.jsonl in the run folder, always, and a backend's run. This base class is
    backend `none`: it keeps the record in the run folder and sends nothing.

    `tags` are the run's labels (experiment, method, scale, seed, git_commit, device, ...; the
    config's `tracking.tags` are added), `params` extra parameters beside the config's own, `source`
    the command that writes the run. `create=False` only continues a run the folder already has (an
    evaluation or a sweep's bookkeeping): without one, nothing is sent. `resume_status` marks a
    continued run as running again."""

    backend: ClassVar[str] = "none"
    id_key: ClassVar[str | None] = None  # the key of the run id in final_metrics.json / eval.json

    def __init__(self, cfg: Config, run_dir: Path, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, *, source: str = "cocomix", create: bool = True,
                 resume_status: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.tags = {**(tags or {}), **cfg.tracking.tags}
        self.params = dict(params or {})
        self.source = source
        self.run_id: str | None = None

    @property
    def active(self) -> bool:
        """Whether the backend takes records now (false for none, and after a failure)."""
        return False

    def log(self, record: dict[str, Any]) -> None:
        """A step record ({"step", "tokens_seen", metric: value}): metrics.jsonl, then the backend."""
        self.metrics.write(record)
        if self.active:
            self.log_metrics(step_metrics(record), int(record["tokens_seen"]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metric values at `step` (tokens seen, or 0 for a summary)."""

    def log_eval(self, tokens_seen: int, metrics: dict[str, float]) -> str | None:
        """Evaluation metrics as `eval/<name>` at `tokens_seen`; the run id, or None if no backend got them."""
        if not self.active:
            return None
        if settings := {f"eval.{k}": str(v) for k, v in metrics.items() if k in EVAL_CONSTANTS}:  # tags, not charts
            self.set_tags(settings)
        self.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items() if k not in EVAL_CONSTANTS}, int(tokens_seen))
        return self.run_id if self.active else None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, KILLED (stopped early on purpose) or FAILED."""

    def close(self) -> None:
        """Let go of a continued run (`create=False`) without changing its recorded status."""

    def end_if_running(self) -> None:
        """A continued run still RUNNING although its process is gone (a superseded folder's): KILLED."""

    def sync(self) -> int | None:
        """Send the backend what it lacks of the record; the number of points sent (None: failed)."""
        return 0

    def catch_up(self) -> None:
        """On a run's start: `sync` if an earlier start left part of the record unsent."""

    def ids(self) -> dict[str, str | None]:
        """{"<backend>_run_id": id} for the run's records ({} for none)."""
        return {self.id_key: self.run_id} if self.id_key else {}


EVAL_CONSTANTS = ("val_blocks",)  # evaluation values that are settings (blocks scored): tags, not metrics
EXPERIMENT_NOTE = ("cocomix experiment {experiment}: one run per (method, scale, seed) and the teacher, SAE, ablations, "
                   "sweep trials and report beside them (tag role). The students: tags.role = 'student', then group by "
                   "tags.method. Metrics: docs/tracking.md.")


def step_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's metrics for a backend: its numbers. The optimizer step is not one (the
    x axis is tokens seen; step = tokens / the param accounting.tokens_per_step)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "tokens_seen") and isinstance(v, (int, float)) and v is not None}


class MLflowTracker(Tracker):
    """One MLflow run per run folder; its id is kept in the folder (`mlflow_run_id`) so a resume
    continues it.

    Every MLflow call is guarded: the first failure turns MLflow off for this run (`client` None),
    warns once and marks the run pending; metrics.jsonl is written whatever happens."""

    backend = "mlflow"
    id_key = "mlflow_run_id"  # also the name of the run folder's file that holds it

    def __init__(self, cfg: Config, run_dir: Path, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, uri: str | None = None, resume_status: bool = True, *,
                 source: str = "cocomix", create: bool = True, standard: dict[str, str] | None = None):
        super().__init__(cfg, run_dir, tags, params, source=source, create=create, resume_status=resume_status)
        self.enabled = cfg.tracking.enabled
        self.client = None
        self.uri = uri or tracking_uri(cfg)
        # MLflow's own tags, set when the run is created: its UI's User and Source columns, and filters
        # (a replay creates the run with those of the process that trained it, kept in the pending mark)
        self.standard = standard or {"mlflow.user": user_name(), "mlflow.source.name": source}
        if not standard and "git_commit" in self.tags:
            self.standard["mlflow.source.git.commit"] = self.tags["git_commit"].removesuffix("-dirty")
        if not self.enabled:
            return
        if not create:
            self._continue(resume_status)
            return
        self.client = connect(cfg, self.run_dir, self.uri)
        if self.client is not None:
            self._guard(self._open_run, resume_status)
        if self.client is None:  # keep what a replay needs to create the run with its tags and params
            mark_pending(self.run_dir, self.uri, _down.get(self.uri, ("unknown",))[0], self.tags, self.params,
                         self.standard)

    def _continue(self, resume_status: bool) -> None:
        """The folder's MLflow run, if it has one; a run that trained (partly) without MLflow is
        replayed first (an unreachable store warns once and leaves the run pending)."""
        id_file = self.run_dir / self.id_key
        self.run_id = id_file.read_text().strip() if id_file.is_file() else None
        if (self.run_dir / PENDING).is_file():
            if replay(self.run_dir, self.cfg) is None:
                return
            self.run_id = id_file.read_text().strip()  # the replay created the run if it had none
        if self.run_id is None:
            return
        self.client = connect(self.cfg, self.run_dir, self.uri)
        if self.client is not None and resume_status:
            self._guard(self.client.update_run, self.run_id, "RUNNING")

    @property
    def active(self) -> bool:
        return self.client is not None

    def _guard(self, fn, *args):
        """Run one MLflow call; on any failure degrade (warn once, mark pending) and return None."""
        if self.client is None:
            return None
        try:
            return fn(*args)
        except (TrackingError, RecordError):  # required-and-down, or a damaged metrics.jsonl: not an outage
            raise
        except Exception as e:
            self.client = None
            degrade(self.cfg, self.uri, e, self.run_dir)
            return None

    def _open_run(self, resume_status: bool) -> None:
        import mlflow
        from mlflow.entities import Param, RunTag

        cfg, uri, tags = self.cfg, self.uri, dict(self.tags)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            artifacts = None
            if uri.startswith("sqlite:///"):  # keep artifacts beside the db, not in whatever CWD is
                artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            try:  # its description (the UI's About): what the runs are and the filter that shows the students
                exp_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts, tags={
                    "mlflow.note.content": EXPERIMENT_NOTE.format(experiment=cfg.experiment)})
            except mlflow.exceptions.MlflowException:  # created concurrently by another run
                exp_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        if cfg.tracking.parent_run_id:  # shown nested under its parent in the MLflow UI
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        params = flatten({k: v for k, v in cfg.to_dict().items() if k != "scales"})
        params.update(self.params)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        id_file = self.run_dir / self.id_key
        if id_file.exists():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            if resume_status:
                self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            items = [p for p in items if p.key not in logged]  # a kill while params were logged
        else:
            run = self.client.create_run(exp_id, run_name=cfg.resolved_run_name, tags={**self.standard, **tags})
            self.run_id = run.info.run_id
            # Record the id before anything else, so a kill from here on cannot orphan the run: the
            # resumed run finds it and continues it.
            atomic_write_text(id_file, self.run_id)
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)
        if self.client is None:
            if self.enabled:
                mark_pending(self.run_dir, self.uri, _down.get(self.uri, ("unknown",))[0], self.tags, self.params,
                         self.standard)
            return
        from mlflow.entities import Param  # lazy: mlflow only when tracking is on

        items = [Param(k, str(v)) for k, v in params.items()]
        self._guard(lambda: self.client.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric  # lazy: mlflow only when tracking is on

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self._guard(self.client.log_batch, self.run_id, batch[i : i + 1000])
            if self.client is None:
                return  # the store went away mid-way: sync sends the rest, without duplicates

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)
        if self.client is not None:
            from mlflow.entities import RunTag  # lazy: mlflow only when tracking is on

            self._guard(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: Path) -> None:
        if self.client is not None:
            self._guard(self.client.log_artifact, self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self._guard(self.client.set_terminated, self.run_id, status)

    def end_if_running(self) -> None:
        run = self._guard(self.client.get_run, self.run_id) if self.client is not None else None
        if run is not None and run.info.status == "RUNNING":
            self.finish("KILLED")

    def catch_up(self) -> None:
        if (self.run_dir / PENDING).is_file():
            self.sync()

    def sync(self) -> int:
        """Send MLflow what it lacks of this run's record (metrics.jsonl, the eval.json of each
        checkpoint, the run files), point by point: (metric, step) pairs already there are skipped, so
        a second sync sends nothing. Clears the pending mark when everything went. Returns the number of
        metric points sent (None if MLflow failed again)."""
        if self.client is None:
            return None
        sent = self._guard(self._sync)
        if sent is not None and self.client is not None:
            (self.run_dir / PENDING).unlink(missing_ok=True)
        return sent

    def _sync(self) -> int:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        wanted: list[Metric] = [m for record in self.metrics.read() for m in _metrics(record, now)]
        for result in checkpoint_files(self.run_dir, "eval.json"):
            done = read_json(result)
            wanted += [Metric(f"eval/{k}", float(v), now, int(done["tokens_seen"]))
                       for k, v in done["metrics"].items() if isinstance(v, (int, float)) and k not in EVAL_CONSTANTS]
        have: dict[str, set[int]] = {}
        for key in {m.key for m in wanted}:
            have[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        missing, seen = [], set()
        for m in wanted:
            if m.step not in have[m.key] and (m.key, m.step) not in seen:
                seen.add((m.key, m.step))
                missing.append(m)
        for i in range(0, len(missing), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=missing[i : i + 1000])
        stored = {a.path for a in self.client.list_artifacts(self.run_id)}
        for name in ("config.yaml", "environment.json", "final_metrics.json"):
            if (self.run_dir / name).is_file() and name not in stored:
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        return len(missing)


def _metrics(record: dict[str, Any], now: int) -> list:
    """A metrics.jsonl record as MLflow metrics at step = tokens seen."""
    from mlflow.entities import Metric

    step = int(record["tokens_seen"])
    return [Metric(k, v, now, step) for k, v in step_metrics(record).items()]


def replay(run_dir: Path, cfg: Config | None = None, uri: str | None = None) -> int | None:
    """Send a run that trained (partly) without MLflow to MLflow: create or continue its MLflow run
    with its params and tags, then `sync`. A finished run (final_metrics.json) ends FINISHED. Returns
    the number of metric points sent, or None when the store is still unreachable (warned once)."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    pending = run_dir / PENDING
    mark = read_json(pending) if pending.is_file() else {}
    uri = uri or mark.get("uri") or tracking_uri(cfg)
    _down.pop(uri, None)  # asked to send now: try the store again, however recently it failed
    tracker = MLflowTracker(cfg, run_dir, mark.get("tags", {}), mark.get("params", {}), uri=uri, resume_status=False,
                            standard=mark.get("standard") or None)
    sent = tracker.sync()
    if sent is not None and (run_dir / "final_metrics.json").is_file():
        tracker.finish("FINISHED")
    return sent if tracker.client is not None else None


RunTracker = MLflowTracker  # the name callers and tests used before the W&B backend


# ---------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------

INIT_TIMEOUT_S = 20.0  # W&B's default waits 90 s for a server that does not answer
WANDB_MISSING = "tracking.backend is wandb but the wandb package is not installed (pip install 'cocomix[wandb]')"


def _wandb_down(cfg: Config, why: str) -> None:
    """W&B failed (`why`): TrackingError if tracking is required, else one warning line a process; W&B
    is not tried again in this process for RETRY_AFTER_S (each try of a dead server costs its timeout)."""
    _down.setdefault("wandb", (why, time.monotonic()))
    what = why if why == WANDB_MISSING else f"W&B failed ({why})"
    if cfg.tracking.required:
        raise TrackingError(what if why == WANDB_MISSING else f"{what} and tracking.required is true")
    if "wandb" not in _warned:
        _warned.add("wandb")
        print(f"cocomix: warning: {what}; going on without W&B, metrics.jsonl is the record", file=sys.stderr,
              flush=True)


class WandbTracker(Tracker):
    """One W&B run per run folder; its id is kept in the folder (`wandb_run_id`) so a resume, or a later
    `cocomix eval` (`create=False`), continues it (`resume="allow"`). Under WANDB_MODE=offline the run
    stays in `<run_dir>/wandb/offline-run-*` for `wandb sync` (`sync_hint`).

    Step = tokens: W&B's own `_step` must only increase, and evaluation points come later, from another
    process, at lower token counts, so no `step=` is passed: every point is logged with `tokens_seen`
    as its x axis (`define_metric("*", step_metric="tokens_seen")`) under the MLflow metric keys.

    Every wandb call is guarded: the first failure ends W&B for this run (`run` None) with one warning
    line (TrackingError when `tracking.required`); metrics.jsonl is written whatever happens. `sync`
    sends nothing (the base's 0): W&B sends an offline run itself, `wandb sync` (`sync_hint`)."""

    backend = "wandb"
    id_key = "wandb_run_id"  # also the name of the run folder's file that holds it

    def __init__(self, cfg: Config, run_dir: Path, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, *, source: str = "cocomix", create: bool = True,
                 resume_status: bool = True):
        super().__init__(cfg, run_dir, tags, params, source=source, create=create, resume_status=resume_status)
        self.run = None
        if not cfg.tracking.enabled or (not create and not (self.run_dir / self.id_key).is_file()):
            return  # nothing to continue: send nothing
        if "wandb" in _down and time.monotonic() - _down["wandb"][1] < RETRY_AFTER_S:
            return _wandb_down(cfg, _down["wandb"][0])  # failed a moment ago: not again
        had_id = (self.run_dir / self.id_key).is_file()
        try:
            import wandb  # lazy: an optional extra; importing cocomix.tracking must not import wandb
        except ImportError:
            return _wandb_down(cfg, WANDB_MISSING)
        try:
            self._open(wandb, create)
        except Exception as e:
            self.run = None
            if not had_id:  # an id W&B never saw is no run's: final_metrics.json must not name it
                (self.run_dir / self.id_key).unlink(missing_ok=True)
                self.run_id = None
            _wandb_down(cfg, _reason(e))

    def _open(self, wandb, create: bool) -> None:
        cfg, id_file = self.cfg, self.run_dir / self.id_key
        self.run_id = id_file.read_text().strip() if id_file.is_file() else os.urandom(4).hex()
        atomic_write_text(id_file, self.run_id)  # before the run starts: a kill from here on cannot orphan it
        config = {}  # a continued run (an evaluation) keeps the config its training gave it
        if create:
            config = {**flatten({k: v for k, v in cfg.to_dict().items() if k != "scales"}), **self.params,
                      **{f"tags.{k}": str(v) for k, v in self.tags.items()}}
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):  # offline: no network at all,
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # not even wandb-core's crash reports
        self.run = wandb.init(project=cfg.tracking.project or cfg.experiment, entity=cfg.tracking.entity,
                              name=cfg.resolved_run_name, id=self.run_id, resume="allow", dir=str(self.run_dir),
                              group=cfg.tracking.parent_run_id, job_type=self.source if create else None,
                              config=config, tags=_wandb_tags(self.tags) if create else None, reinit="create_new",
                              # silent: nothing on stdout; console off: stdout and stderr stay unwrapped
                              settings=wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S))
        self.run.define_metric("tokens_seen")
        self.run.define_metric("*", step_metric="tokens_seen")

    @property
    def active(self) -> bool:
        return self.run is not None

    def _guard(self, fn):
        """Run one wandb call (returns its result); on any failure end W&B for this run (warn once)."""
        if self.run is None:
            return None
        try:
            return fn()
        except Exception as e:  # TrackingError comes from _wandb_down only, after this
            self.run = None
            _wandb_down(self.cfg, _reason(e))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._guard(lambda: self.run.log({"tokens_seen": int(step), **{k: float(v) for k, v in metrics.items()}}))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)
        self._guard(lambda: self.run.config.update(params, allow_val_change=True))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)
        self._guard(lambda: self.run.config.update({f"tags.{k}": str(v) for k, v in tags.items()},
                                                   allow_val_change=True))
        self._guard(lambda: setattr(self.run, "tags", tuple(dict.fromkeys([*self.run.tags, *_wandb_tags(tags)]))))

    def log_artifact(self, path: Path) -> None:
        """A run file, as `<folder>/<name>` (W&B keeps config.yaml and wandb-* at the top for its own),
        copied into the run's own files first: W&B links a file outside them by its path, which a
        folder renamed into place (the SAE's) would break."""
        path = Path(path).resolve()

        def save():
            copy = Path(self.run.dir) / path.parent.name / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")
        self._guard(save)

    def finish(self, status: str = "FINISHED") -> None:
        self._guard(lambda: self.run.summary.update({"status": status}))
        self._guard(lambda: self.run.finish(exit_code=0 if status == "FINISHED" else 1))
        self.run = None

    def close(self) -> None:
        """W&B has no detach: a run open in this process ends with `finish`, which records an exit code.
        A continued run (an evaluation) therefore ends with the code of the status its training recorded,
        as far as this process knows it (offline: unknown, so 0)."""
        status = self._guard(lambda: self.run.summary.get("status"))
        self._guard(lambda: self.run.finish(exit_code=0 if status in (None, "FINISHED") else 1))
        self.run = None

    @staticmethod
    def sync_hint(run_dir: Path) -> str:
        """The line `cocomix track-sync` prints for a W&B run folder: the `wandb sync` command to run."""
        if not any((Path(run_dir) / "wandb").glob("offline-run-*")):
            return "no offline W&B run in the folder (an online run was sent as it ran): nothing to send"
        return f"W&B sends its offline runs itself: run `wandb sync {run_dir}/wandb/offline-run-*`"


def _wandb_tags(tags: dict[str, str]) -> list[str]:
    return [f"{k}:{v}"[:64] for k, v in tags.items()]  # W&B's run tags: at most 64 characters each



def open_tracker(cfg: Config, run_dir: Path, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 *, source: str = "cocomix", create: bool = True, resume_status: bool = True) -> Tracker:
    """The tracker of `run_dir` for the config's backend (see `Tracker` for the arguments)."""
    backend = backend_of(cfg)
    kind = MLflowTracker if backend == "mlflow" else WandbTracker if backend == "wandb" else Tracker
    return kind(cfg, Path(run_dir), tags, params, source=source, create=create, resume_status=resume_status)


def sync_run(run_dir: Path, uri: str | None = None) -> str | None:
    """`cocomix track-sync`: send a run folder's record to its backend. Returns a line saying what went,
    or None when the store is still unreachable (the warning line said so; the run stays pending)."""
    cfg = run_config(Path(run_dir))
    if backend_of(cfg) == "wandb":
        return WandbTracker.sync_hint(run_dir)
    if backend_of(cfg) == "none":
        return "tracking.backend is none (or tracking.enabled false) for this run: nothing to send"
    sent = replay(run_dir, cfg, uri=uri)
    return None if sent is None else f"{sent} metric point(s) sent to MLflow"
