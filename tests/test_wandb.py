"""The W&B backend (cocomix/tracking.py, WandbTracker) against the real wandb package, offline: what a
training and a later evaluation write to the run's transaction log (`run-<id>.wandb`, read back with
wandb's own reader, `wandb leet inspect --json`), and that backend none writes the run folder only."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

wandb = pytest.importorskip("wandb")

from cocomix import tracking  # noqa: E402
from cocomix.config import load_config  # noqa: E402

RECORDS = [{"step": i, "tokens_seen": 512 * i, "train/loss": 3.0 - 0.25 * i, "train/lr": 1e-3 * i, "train/note": "x"}
           for i in (1, 2, 3)]
EVAL = {"val_loss": 3.1, "synth_topic/acc": 0.4}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, with its own folders under tmp_path (nothing in the user's home). W&B reads its
    environment once a process (`wandb.setup`): `wandb.teardown` makes each test read it afresh."""
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)  # the tracker sets it offline; restored after
    monkeypatch.setattr(tracking, "_warned", set())
    monkeypatch.setattr(tracking, "_down", {})  # a failure another test provoked is not this one's
    yield tmp_path
    wandb.teardown()


def config(tmp_path, *overrides):
    return load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "tracking.backend=wandb", *overrides])


def transaction_log(path):
    """The records of a `.wandb` file, as wandb-core's reader prints them (one JSON object a line)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def of_type(records, kind):
    return [r[kind] for r in records if r["type"] == kind]


def test_training_and_a_later_evaluation_log_one_wandb_run_on_the_tokens_axis(wandb_env, capfd):
    tmp_path = wandb_env
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / cfg.resolved_run_name
    run_dir.mkdir(parents=True)
    tracker = tracking.open_tracker(cfg, run_dir, {"method": "ntp", "seed": "0"}, {"accounting.params": 7})
    assert isinstance(tracker, tracking.WandbTracker) and tracker.active
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # offline: not even wandb-core's crash reports
    for record in RECORDS:
        tracker.log(record)
    (run_dir / "config.yaml").write_text("method: ntp\n")
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.finish()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert tracker.ids() == {"wandb_run_id": run_id} and not tracker.active

    evaluation = tracking.open_tracker(cfg, run_dir, create=False, resume_status=False)  # as `cocomix eval`
    assert evaluation.log_eval(1024, EVAL) == run_id
    evaluation.finish()
    assert capfd.readouterr() == ("", "")  # silent: W&B prints nothing, on stdout or stderr

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2, files  # one file per process, one run
    train, later = (transaction_log(f) for f in files)
    assert [r["run_id"] for r in of_type(train, "run") + of_type(later, "run")] == [run_id] * 2
    run = of_type(train, "run")[0]
    assert run["display_name"] == cfg.resolved_run_name and run["project"] == cfg.experiment
    assert {"method:ntp", "seed:0"} <= set(run["tags"])
    assert run["config"]["update"]["accounting.params"] == 7
    assert run["config"]["update"]["train.tokens"] == cfg.train.tokens

    def rows(records):  # history rows without W&B's own keys (_step, _runtime, _timestamp)
        return [{k: v for k, v in h["item"].items() if not k.startswith("_")} for h in of_type(records, "history")]

    expected = [{"tokens_seen": r["tokens_seen"], **tracking.step_metrics(r)} for r in RECORDS]  # what MLflow gets
    got = rows(train)
    assert [set(row) for row in got] == [set(row) for row in expected]
    assert got == [pytest.approx(row) for row in expected]
    assert rows(later) == [pytest.approx({"tokens_seen": 1024, "eval/val_loss": 3.1, "eval/synth_topic/acc": 0.4})]
    axis = [m for m in of_type(train, "metric") if m.get("glob_name") == "*"]
    assert [m["step_metric"] for m in axis] == ["tokens_seen"]
    assert f"{run_dir.name}/config.yaml" in {f["path"] for files in of_type(train, "files") for f in files["files"]}
    assert [s["update"]["status"] for s in of_type(train, "summary") if "status" in s["update"]] == ["FINISHED"]
    assert [e.get("exit_code", 0) for e in of_type(train, "exit") + of_type(later, "exit")] == [0, 0]
    hint = tracking.WandbTracker.sync_hint(run_dir)
    assert f"wandb sync {run_dir}/wandb/offline-run-*" in hint and "\n" not in hint


def test_an_evaluation_of_a_run_without_a_wandb_run_sends_nothing(wandb_env):
    cfg = config(wandb_env)
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    tracker = tracking.open_tracker(cfg, run_dir, create=False)
    assert not tracker.active and tracker.log_eval(1024, EVAL) is None
    tracker.finish()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()


def test_backend_none_writes_the_run_folder_only(wandb_env):
    cfg = config(wandb_env, "tracking.backend=none")
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    tracker = tracking.open_tracker(cfg, run_dir, {"method": "ntp"}, {"accounting.params": 7})
    assert type(tracker) is tracking.Tracker and not tracker.active
    for record in RECORDS:
        tracker.log(record)
    assert tracker.log_eval(1024, EVAL) is None
    tracker.finish()
    assert tracker.ids() == {}
    assert [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == RECORDS
    assert not list(wandb_env.rglob("wandb")) and not list(wandb_env.rglob("mlflow.db"))
    assert not list(wandb_env.rglob("mlflow_run_id")) and not list(wandb_env.rglob("wandb_run_id"))


def test_a_wandb_run_that_cannot_start_degrades_to_one_warning_or_one_error(wandb_env, monkeypatch, capsys):
    # Online without credentials (none in the environment, HOME or W&B's config folder): wandb.init fails
    # before it sends anything. Tracking goes on without W&B; tracking.required makes it one line.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(wandb_env))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    tracker = tracking.open_tracker(config(wandb_env), run_dir, {"method": "ntp"})
    assert not tracker.active
    tracker.log(RECORDS[0])
    tracker.finish("FAILED")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cocomix: warning: W&B failed (") and "going on without W&B" in err[0]
    assert (run_dir / "metrics.jsonl").read_text().strip() == json.dumps(RECORDS[0])
    assert tracker.ids() == {"wandb_run_id": None} and not (run_dir / "wandb_run_id").exists()  # no id W&B never saw
    start = time.monotonic()  # a failed W&B is not tried again at once (each try costs its timeout)
    again = tracking.open_tracker(config(wandb_env), wandb_env / "run1")
    assert not again.active and time.monotonic() - start < 1 and not capsys.readouterr().err  # warned once
    with pytest.raises(tracking.TrackingError, match=r"^W&B failed \(.*\) and tracking.required is true$"):
        tracking.open_tracker(config(wandb_env, "tracking.required=true"), wandb_env / "run2")


def test_cocomix_eval_of_two_checkpoints_closes_each_wandb_run_it_continues(wandb_env):
    # evals/run.py logs each checkpoint's numbers through a continued tracker, then closes it: W&B keeps
    # one open run per tracker in a process, so an unclosed one per checkpoint would pile up.
    from evals.run import _log_tracked

    cfg = config(wandb_env)
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    training = tracking.open_tracker(cfg, run_dir, {"method": "ntp"})
    training.log(RECORDS[0])
    training.finish()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert _log_tracked(cfg, run_dir, 512, EVAL) == {"wandb_run_id": run_id}
    assert _log_tracked(cfg, run_dir, 1536, {"val_loss": 2.9}) == {"wandb_run_id": run_id}
    assert _log_tracked(cfg, None, 1536, EVAL) == {}  # a checkpoint outside a run folder: no run to log to
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    logs = [transaction_log(f) for f in files]
    assert len(files) == 3 and all(of_type(log, "exit") for log in logs)  # every process-side run ended
    assert [[h["item"]["tokens_seen"] for h in of_type(log, "history")] for log in logs] == [[512], [512], [1536]]


def test_wandb_and_mlflow_hold_the_same_metric_keys_at_the_same_token_steps(wandb_env):
    # The same training record and evaluation through both backends; read each back from its own store.
    import mlflow

    records = {}
    for backend in ("mlflow", "wandb"):
        cfg = config(wandb_env, f"tracking.backend={backend}", f"tracking.uri=sqlite:///{wandb_env / 'mlflow.db'}")
        run_dir = wandb_env / backend
        run_dir.mkdir()
        tracker = tracking.open_tracker(cfg, run_dir, {"method": "ntp"})
        for record in RECORDS:
            tracker.log(record)
        tracker.finish()
        later = tracking.open_tracker(cfg, run_dir, create=False, resume_status=False)
        later.log_eval(1024, EVAL)
        later.close()
        records[backend] = run_dir
    client = mlflow.MlflowClient(f"sqlite:///{wandb_env / 'mlflow.db'}")
    run = client.get_run((records["mlflow"] / "mlflow_run_id").read_text())
    in_mlflow = {(key, m.step): m.value for key in run.data.metrics
                 for m in client.get_metric_history(run.info.run_id, key)}
    in_wandb = {(k, row["tokens_seen"]): v
                for f in sorted((records["wandb"] / "wandb").glob("offline-run-*/run-*.wandb"))
                for h in of_type(transaction_log(f), "history") for row in [h["item"]]
                for k, v in row.items() if not k.startswith("_") and k != "tokens_seen"}
    assert len(in_mlflow) == 3 * 2 + 2 and set(in_wandb) == set(in_mlflow)  # train/loss and lr; 2 evals
    assert in_wandb == pytest.approx(in_mlflow)
