"""Run tracking: MLflow (sqlite under results/ by default) plus a metrics.jsonl per run.

The jsonl file is the source of truth for tables (it needs no server); MLflow is where people
compare runs in a UI. Metrics are logged with MLflow `step = tokens seen`, so curves of runs with
different batch sizes line up, and evaluation curves (logged later by `cocomix eval`) sit on the
same axis.

Tracking degrades, it never blocks a run: an unreachable server is found by a probe with a short
timeout, MLflow's own HTTP retries are bounded, and any failure of an MLflow call turns tracking off
for the rest of the run with one warning line. The run goes on with metrics.jsonl as its record and
leaves `mlflow_pending.json` in its folder; `replay` (on the run's next start, before `cocomix eval`
logs to it, or `cocomix track-sync RUN_DIR`) sends what MLflow lacks, point by point, so nothing is
logged twice. `tracking.required: true` makes an unreachable server a one-line error instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cocomix.config import Config, config_from_dict
from cocomix.faults import point
from cocomix.files import atomic_write_bytes, atomic_write_json, atomic_write_text, list_checkpoints

PENDING = "mlflow_pending.json"  # in a run folder: MLflow lacks some of this run's record
PROBE_TIMEOUT_S = 3.0
# MLflow's defaults retry a dead server for about 268 s (7 retries, backoff factor 2, 120 s timeout):
# a cluster job would lose its allocation to a tracking outage. Users' own settings win.
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
    """Create the MLflow schema once, under a file lock.

    Several processes creating a fresh sqlite store at once race in the schema migrations
    (see shared/notes/ecosystem-facts.md section 5); the lock makes the first creation serial.
    """
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


def mark_pending(run_dir: Path, uri: str, reason: str, tags: dict | None = None, params: dict | None = None):
    path = Path(run_dir) / PENDING
    old = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_json(path, {"uri": uri, "reason": reason, "since": old.get("since", time.strftime("%Y-%m-%d %H:%M:%S")),
                             "tags": tags if tags is not None else old.get("tags", {}),
                             "params": params if params is not None else old.get("params", {})})


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


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Besides torch and transformers, the packages that shape a result (tokenisation, data loading,
# evaluation, tracking, sweeps, the DAG, the weights' file format).
RESULT_PACKAGES = ("tokenizers", "datasets", "lm_eval", "mlflow", "optuna", "snakemake", "safetensors", "numpy")


def environment_info() -> dict[str, str]:
    """Versions and hardware, recorded with every run so a log is a reproducible artifact."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "git_commit": git_commit(),
    }
    for name in RESULT_PACKAGES:  # read from package metadata: importing them would cost seconds
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint are dropped.

    A checkpoint records the log's size and sha256 at its step (`prefix`); resuming from it keeps
    exactly those bytes, so a line torn by a kill, or anything written after the checkpoint, goes,
    and a log changed or damaged before the checkpoint is a one-line error, not a silent gap."""

    def __init__(self, path: Path):
        self.path = path

    def prefix(self) -> dict[str, Any]:
        """{"bytes", "sha256"} of the log as it is now (what a checkpoint records)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def truncate_to(self, prefix: dict[str, Any], checkpoint: Path) -> None:
        """Keep the first prefix["bytes"] bytes, after checking their sha256 against the checkpoint's record."""
        data = self.path.read_bytes() if self.path.exists() else b""
        head = data[: prefix["bytes"]]
        if len(head) != prefix["bytes"] or hashlib.sha256(head).hexdigest() != prefix["sha256"]:
            raise TrackingError(f"{self.path}: its first {prefix['bytes']} bytes differ from what checkpoint "
                                f"{checkpoint} recorded (changed or damaged); restore the file, or move the run "
                                "folder away to start over")
        if len(data) != len(head):
            atomic_write_bytes(self.path, head)

    def truncate_after(self, tokens_seen: int) -> None:
        """Keep the lines up to `tokens_seen` (checkpoints from before `prefix` was recorded)."""
        if not self.path.exists():
            return
        kept = [json.dumps(r) for r in self.read() if r["tokens_seen"] <= tokens_seen]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            point("metrics.line")  # a kill here leaves a torn last line
            fh.write(line[len(line) // 2 :])

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line torn by a kill (no newline) is left out, any other line that is
        not a JSON record is a one-line error naming the file and line."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "tokens_seen" not in record:
                    raise ValueError("not a metrics record")
                records.append(record)
            except ValueError:
                if i == len(lines):  # the last line and no newline after it: torn by a kill
                    break
                raise TrackingError(f"{self.path} line {i}: not a JSON metrics record (damaged); restore the file, "
                                    "or move the run folder away to start over") from None
        return records


class RunTracker:
    """One MLflow run per training run; its id is kept in the run folder so a resume reuses it.

    Every MLflow call is guarded: the first failure turns MLflow off for this run (`client` None),
    warns once and marks the run pending; metrics.jsonl is written whatever happens."""

    def __init__(self, cfg: Config, run_dir: Path, tags: dict[str, str], params: dict[str, Any] | None = None,
                 uri: str | None = None, resume_status: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.enabled = cfg.tracking.enabled
        self.client = None
        self.run_id: str | None = None
        self.uri = uri or tracking_uri(cfg)
        self.tags = {**tags, **cfg.tracking.tags}
        self.params = dict(params or {})
        if not self.enabled:
            return
        self.client = connect(cfg, run_dir, self.uri)
        if self.client is not None:
            self._guard(self._open_run, resume_status)
        if self.client is None:  # keep what a replay needs to create the run with its tags and params
            mark_pending(run_dir, self.uri, _down.get(self.uri, ("unknown",))[0], self.tags, self.params)

    def _guard(self, fn, *args):
        """Run one MLflow call; on any failure degrade (warn once, mark pending) and return None."""
        if self.client is None:
            return None
        try:
            return fn(*args)
        except TrackingError:
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
            try:
                exp_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
            except mlflow.exceptions.MlflowException:  # created concurrently by another run
                exp_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        if cfg.tracking.parent_run_id:  # shown nested under its parent in the MLflow UI
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        params = flatten({k: v for k, v in cfg.to_dict().items() if k != "scales"})
        params.update(self.params)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        id_file = self.run_dir / "mlflow_run_id"
        if id_file.exists():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            if resume_status:
                self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            items = [p for p in items if p.key not in logged]  # a kill while params were logged
        else:
            run = self.client.create_run(exp_id, run_name=cfg.resolved_run_name, tags=tags)
            self.run_id = run.info.run_id
            # Record the id before anything else, so a kill from here on cannot orphan the run: the
            # resumed run finds it and continues it.
            atomic_write_text(id_file, self.run_id)
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: mlflow only when tracking is on

        self.params.update(params)
        if self.client is None:
            if self.enabled:
                mark_pending(self.run_dir, self.uri, _down.get(self.uri, ("unknown",))[0], self.tags, self.params)
            return
        items = [Param(k, str(v)) for k, v in params.items()]
        self._guard(lambda: self.client.log_batch(self.run_id, params=items))

    def log(self, record: dict[str, Any]) -> None:
        """`record` holds step, tokens_seen and metric values (floats)."""
        self.metrics.write(record)
        if self.client is None:
            return
        self._guard(self.client.log_batch, self.run_id, _metrics(record, int(time.time() * 1000)))

    def log_artifact(self, path: Path) -> None:
        if self.client is not None:
            self._guard(self.client.log_artifact, self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self._guard(self.client.set_terminated, self.run_id, status)

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
        for ckpt in list_checkpoints(self.run_dir):
            result = ckpt / "eval.json"
            if result.is_file():
                done = json.loads(result.read_text())
                wanted += [Metric(f"eval/{k}", float(v), now, int(done["tokens_seen"]))
                           for k, v in done["metrics"].items() if isinstance(v, (int, float))]
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
    """A metrics.jsonl record as MLflow metrics at step = tokens seen (plus train/step)."""
    from mlflow.entities import Metric

    step = int(record["tokens_seen"])
    metrics = [Metric(k, float(v), now, step) for k, v in record.items()
               if k not in ("step", "tokens_seen") and isinstance(v, (int, float)) and v is not None]
    metrics.append(Metric("train/step", float(record["step"]), now, step))
    return metrics


def run_config(run_dir: Path) -> Config:
    """The resolved config a run folder was trained with (its config.yaml)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TrackingError(f"{run_dir}: no config.yaml, not a run folder")
    return config_from_dict(yaml.safe_load(path.read_text()))


def replay(run_dir: Path, cfg: Config | None = None, uri: str | None = None) -> int | None:
    """Send a run that trained (partly) without MLflow to MLflow: create or continue its MLflow run
    with its params and tags, then `sync`. A finished run (final_metrics.json) ends FINISHED. Returns
    the number of metric points sent, or None when the store is still unreachable (warned once)."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    pending = run_dir / PENDING
    mark = json.loads(pending.read_text()) if pending.is_file() else {}
    uri = uri or mark.get("uri") or tracking_uri(cfg)
    _down.pop(uri, None)  # asked to send now: try the store again, however recently it failed
    tracker = RunTracker(cfg, run_dir, mark.get("tags", {}), mark.get("params", {}), uri=uri, resume_status=False)
    sent = tracker.sync()
    if sent is not None and (run_dir / "final_metrics.json").is_file():
        tracker.finish("FINISHED")
    return sent if tracker.client is not None else None
