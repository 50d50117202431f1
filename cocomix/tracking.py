"""Run tracking: MLflow (sqlite under results/ by default) plus a metrics.jsonl per run.

The jsonl file is the source of truth for tables (it needs no server); MLflow is where people
compare runs in a UI. Metrics are logged with MLflow `step = tokens seen`, so curves of runs with
different batch sizes line up, and evaluation curves (logged later by `cocomix eval`) sit on the
same axis.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from cocomix.config import Config
from cocomix.files import atomic_write_text


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
    """Append-only metrics.jsonl; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, tokens_seen: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["tokens_seen"] <= tokens_seen
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class RunTracker:
    """One MLflow run per training run; its id is kept in the run folder so a resume reuses it."""

    def __init__(self, cfg: Config, run_dir: Path, tags: dict[str, str]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.enabled = cfg.tracking.enabled
        self.client = None
        self.run_id: str | None = None
        if not self.enabled:
            return
        import mlflow
        from mlflow.entities import Param, RunTag

        uri = tracking_uri(cfg)
        init_store(uri)
        self.client = mlflow.MlflowClient(uri)
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
        tags = {**tags, **cfg.tracking.tags}
        if cfg.tracking.parent_run_id:  # shown nested under its parent in the MLflow UI
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        params = flatten({k: v for k, v in cfg.to_dict().items() if k != "scales"})
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            if len(self.client.get_run(self.run_id).data.params) >= len(items):
                return
            # else the run was killed while its params were being logged: log them again (same values)
        else:
            run = self.client.create_run(exp_id, run_name=cfg.resolved_run_name, tags=tags)
            self.run_id = run.info.run_id
            # Record the id before anything else, so a kill from here on cannot orphan the run: the
            # resumed run finds it and continues it.
            atomic_write_text(id_file, self.run_id)
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log(self, record: dict[str, Any]) -> None:
        """`record` holds step, tokens_seen and metric values (floats)."""
        self.metrics.write(record)
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["tokens_seen"])
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in record.items()
            if k not in ("step", "tokens_seen") and isinstance(v, (int, float)) and v is not None
        ]
        metrics.append(Metric("train/step", float(record["step"]), now, step))
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
