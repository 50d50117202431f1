"""Tracking degrades, never blocks: an unreachable MLflow is found in seconds, the run goes on with
metrics.jsonl as its record, and its metrics reach MLflow later without duplicates."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli, tiny_overrides
from cocomix import records, tracking
from cocomix.config import load_config
from cocomix.checkpoints import list_checkpoints

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    # What a process learnt about dead servers (and warned about) would leak between tests.
    monkeypatch.setattr(tracking, "_down", {})
    monkeypatch.setattr(tracking, "_warned", set())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp_path, uri, *extra):
    return load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "tracking.enabled=true",
                                                   f"tracking.uri={uri}", *extra])


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_server_that_never_answers_is_given_up_within_seconds_with_one_warning(tmp_path, capsys):
    # A firewall that drops packets: the connection is accepted by the kernel, no answer ever comes.
    # MLflow's own retries took 268 s and then raised, before the training started.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run_dir = tmp_path / "run"
        start = time.monotonic()
        tracker = tracking.RunTracker(_cfg(tmp_path, uri), run_dir, {"method": "ntp"}, params={"accounting.params": 7})
        took = time.monotonic() - start
        assert tracker.client is None and took < tracking.PROBE_TIMEOUT_S + 2, took
        tracker.log({"step": 1, "tokens_seen": 64, "train/loss": 2.5})  # no MLflow call is tried again
        assert time.monotonic() - start < tracking.PROBE_TIMEOUT_S + 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cocomix: warning: tracking server {uri} unreachable (no answer within 3 s); "), lines
    assert f"cocomix track-sync {run_dir}" in lines[0]
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "tokens_seen": 64, "train/loss": 2.5}]
    pending = json.loads((run_dir / tracking.PENDING).read_text())
    assert (pending["uri"], pending["tags"], pending["params"]) == (uri, {"method": "ntp"}, {"accounting.params": 7})


def test_tracking_required_turns_the_warning_into_one_error_line(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens: refused at once
    with pytest.raises(tracking.TrackingError) as e:
        tracking.RunTracker(_cfg(tmp_path, uri, "tracking.required=true"), tmp_path / "run", {})
    assert str(e.value) == (f"tracking server {uri} unreachable (ConnectionRefusedError: [Errno 111] Connection "
                            "refused) and tracking.required is true")


def test_a_store_that_goes_away_mid_run_loses_nothing_and_replay_sends_each_point_once(tmp_path, capsys, caplog):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, run_dir = _cfg(tmp_path, uri), tmp_path / "run"
    tracker = tracking.RunTracker(cfg, run_dir, {"method": "ntp"})
    records = [{"step": s, "tokens_seen": 64 * s, "train/loss": 3.0 / s} for s in range(1, 6)]
    for r in records[:2]:
        tracker.log(r)
    # The server goes away: the tracker's client now talks to a port where nothing listens.
    tracker.client = mlflow.MlflowClient(f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    for r in records[2:]:
        tracker.log(r)
    assert tracker.client is None and time.monotonic() - start < 30  # bounded retries, then no more tries
    lines = [x for x in capsys.readouterr().err.splitlines() if "INFO mlflow" not in x]  # the new sqlite store
    assert len(lines) == 1 and lines[0].startswith(f"cocomix: warning: tracking server {uri} unreachable ("), lines
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # no line per retry
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == records
    # An evaluation written while MLflow was away is part of the record too.
    ckpt = run_dir / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / "eval.json").write_text(json.dumps({"tokens_seen": 256, "metrics": {"val_ppl": 12.5}}))
    assert list_checkpoints(run_dir) == [ckpt]

    assert tracking.replay(run_dir, cfg) == 3 + 1  # train/loss of 3 records, one eval point
    assert not (run_dir / tracking.PENDING).exists()
    client, run_id = mlflow.MlflowClient(uri), (run_dir / "mlflow_run_id").read_text()
    assert _history(client, run_id, "train/loss") == [(r["tokens_seen"], r["train/loss"]) for r in records]
    assert _history(client, run_id, "train/step") == []  # the step is no metric: tokens seen is the x axis
    assert _history(client, run_id, "eval/val_ppl") == [(256, 12.5)]
    assert tracking.replay(run_dir, cfg) == 0  # nothing twice
    assert len(client.get_metric_history(run_id, "train/loss")) == 5


def test_replay_keeps_the_trainers_source_and_user_and_a_damaged_log_is_not_an_outage(tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens: the run starts without MLflow
    cfg, run_dir = _cfg(tmp_path, uri), tmp_path / "run"
    tracker = tracking.MLflowTracker(cfg, run_dir, {"method": "ntp", "git_commit": "abc123-dirty"}, uri=down,
                                     source="cocomix train")
    tracker.log({"step": 1, "tokens_seen": 64, "train/loss": 2.5})
    # A later process (`cocomix track-sync`, another user) sends it: MLflow's own tags are the trainer's.
    standard = json.loads((run_dir / tracking.PENDING).read_text())["standard"]
    standard["mlflow.user"] = "trainer"  # as if another user had trained it
    mark = json.loads((run_dir / tracking.PENDING).read_text())
    (run_dir / tracking.PENDING).write_text(json.dumps({**mark, "standard": standard}))
    assert tracking.replay(run_dir, cfg, uri=uri) == 1  # train/loss (the step is no metric)
    tags = mlflow.MlflowClient(uri).get_run((run_dir / "mlflow_run_id").read_text()).data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.user"], tags["mlflow.source.git.commit"]) == (
        "cocomix train", "trainer", "abc123")
    # A damaged metrics.jsonl stops the sync with its own one line: the store is not marked down.
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "tokens_seen": 64}\nnot json\n')
    capsys.readouterr()
    with pytest.raises(records.RecordError, match=r"metrics.jsonl line 2: not a JSON metrics record"):
        tracking.replay(run_dir, cfg, uri=uri)
    assert uri not in tracking._down and "unreachable" not in capsys.readouterr().err


def test_a_trials_bookkeeping_sends_a_trial_that_trained_without_mlflow_under_its_own_config(tmp_path):
    import mlflow
    import optuna

    from cocomix.sweep import _record_trial_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial_cfg = _cfg(tmp_path, uri, "run_name=trial-3", "concept.k=7", "tracking.parent_run_id=parent-id")
    run_dir = trial_cfg.run_dir
    tracking.MLflowTracker(trial_cfg, run_dir, {"method": "cocomix"}, uri=f"http://127.0.0.1:{_free_port()}")
    assert (run_dir / tracking.PENDING).is_file() and not (run_dir / "mlflow_run_id").exists()
    (run_dir / tracking.PENDING).write_text(json.dumps({**json.loads((run_dir / tracking.PENDING).read_text()),
                                                        "uri": uri}))  # the store is back
    trial = optuna.create_study().ask()
    _record_trial_run(trial_cfg, trial, "PRUNED")
    run = mlflow.MlflowClient(uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.run_name == "trial-3" and run.data.params["concept.k"] == "7"
    assert run.data.tags["mlflow.parentRunId"] == "parent-id" and run.data.tags["optuna.state"] == "PRUNED"


def _train(results, data, uri, *extra, env=ENV):
    args = tiny_overrides(results, data, "tracking.enabled=true", f"tracking.uri={uri}", "train.tokens=40960",
                          "eval.every_tokens=10240", *extra)
    proc = subprocess.Popen(cli("train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *args),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, load_config(ROOT / "config/tiny.yaml", args).run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_server(root: Path, port: int):
    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=root, env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            tracking.probe(f"http://127.0.0.1:{port}")
            return server
        except tracking.Unreachable:
            assert server.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start in 180 s")


def _assert_mlflow_equals_the_log(uri, run_dir, finished=True):
    import mlflow

    client, log = mlflow.MlflowClient(uri), _metrics(run_dir)
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    for key in ("train/loss", "val/loss"):
        want = [(r["tokens_seen"], r[key]) for r in log if key in r]
        assert len(want) > 1 and _history(client, run.info.run_id, key) == want, key
    assert run.data.tags["method"] == "ntp" and int(run.data.params["accounting.params"]) > 0
    assert run.data.params["train.tokens"] == "40960"
    if finished:
        assert run.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "final_metrics.json"}


@pytest.mark.slow
def test_training_with_the_server_down_takes_its_normal_time_and_reaches_mlflow_once_it_is_back(tmp_path, tiny_data):
    normal, normal_dir = _train(tmp_path / "normal", tiny_data, f"sqlite:///{tmp_path / 'normal.db'}")
    start = time.monotonic()
    assert normal.wait(timeout=600) == 0, normal.stderr.read()[-2000:]
    normal_s = time.monotonic() - start

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    down, run_dir = _train(tmp_path / "down", tiny_data, uri)
    start = time.monotonic()
    assert down.wait(timeout=600) == 0, down.stderr.read()[-2000:]
    down_s = time.monotonic() - start
    assert down_s < normal_s + 30, (down_s, normal_s)
    err = down.stderr.read()
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"cocomix: warning: tracking server {uri} unreachable (ConnectionRefusedError: [Errno 111] Connection "
        f"refused); going on without MLflow, metrics.jsonl is the record; its metrics reach MLflow on the next "
        f"start or with `cocomix track-sync {run_dir}`"]
    assert [r["step"] for r in _metrics(run_dir)] == [r["step"] for r in _metrics(normal_dir)]
    assert (run_dir / tracking.PENDING).is_file() and not (run_dir / "mlflow_run_id").exists()

    required = subprocess.run(cli("train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress",
                                  *tiny_overrides(tmp_path / "req", tiny_data, "tracking.enabled=true",
                                                  f"tracking.uri={uri}", "tracking.required=true")),
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert required.returncode == 1 and required.stderr.strip().splitlines() == [
        f"cocomix: error: tracking server {uri} unreachable (ConnectionRefusedError: [Errno 111] Connection "
        "refused) and tracking.required is true"], required.stderr[-2000:]

    # Still down: track-sync says so in one line and keeps the run pending.
    still = subprocess.run(cli("track-sync", str(run_dir)), env=ENV, capture_output=True, text=True, timeout=300)
    assert still.returncode == 1 and len(still.stderr.strip().splitlines()) == 1 and "Traceback" not in still.stderr
    assert (run_dir / tracking.PENDING).is_file()

    server = _mlflow_server(tmp_path / "server", port)
    try:
        sync = subprocess.run(cli("track-sync", str(run_dir)), env=ENV, capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr[-2000:]
        n_points = sum(len([k for k in r if k not in ("step", "tokens_seen")]) for r in _metrics(run_dir))
        # (MLflow itself prints the run's UI link when an http run ends.)
        assert sync.stdout.strip().splitlines()[-1] == f"{run_dir}: {n_points} metric point(s) sent to MLflow"
        _assert_mlflow_equals_the_log(uri, run_dir)
        again = subprocess.run(cli("track-sync", str(run_dir)), env=ENV, capture_output=True, text=True, timeout=300)
        assert again.stdout.strip().splitlines()[-1] == f"{run_dir}: 0 metric point(s) sent to MLflow", again.stderr
        _assert_mlflow_equals_the_log(uri, run_dir)
        assert not (run_dir / tracking.PENDING).exists()
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
def test_a_run_killed_while_mlflow_was_down_sends_its_metrics_on_its_next_start(tmp_path, tiny_data):
    # First start: the server is down; SIGKILL after the first checkpoint. Second start: the store
    # answers (MLFLOW_TRACKING_URI, which is not part of the run's identity): it resumes, sends what the
    # first start logged up to its checkpoint, then logs the rest; MLflow ends equal to metrics.jsonl.
    args = tiny_overrides(tmp_path, tiny_data, "tracking.enabled=true", "train.tokens=40960",
                          "checkpoint.every_tokens=10240", "eval.every_tokens=10240")
    run_dir = load_config(ROOT / "config/tiny.yaml", args).run_dir
    command = cli("train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *args)
    down = {**ENV, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    first = subprocess.Popen(command, env=down, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list_checkpoints(run_dir)) < 2 and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert 0 < len(list_checkpoints(run_dir)) < 4 and (run_dir / tracking.PENDING).is_file()

    uri = f"sqlite:///{tmp_path / 'back.db'}"
    second = subprocess.run(command, env={**ENV, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "resumed from" in second.stdout, second.stdout
    assert not (run_dir / tracking.PENDING).exists()
    _assert_mlflow_equals_the_log(uri, run_dir)


def _tracked_run_past_its_first_checkpoint(tmp_path, tiny_data):
    """`cocomix train` of a tracked tiny run, returned once its first checkpoint exists:
    (tracking uri, run folder, the command, the running process with stdout and stderr piped)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = tiny_overrides(tmp_path, tiny_data, "tracking.enabled=true", f"tracking.uri={uri}", "train.tokens=40960",
                          "checkpoint.every_tokens=10240", "eval.every_tokens=10240")
    run_dir = load_config(ROOT / "config/tiny.yaml", args).run_dir
    command = cli("train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *args)
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(run_dir) and proc.poll() is None:
        time.sleep(0.05)
    return uri, run_dir, command, proc


@pytest.mark.slow
def test_a_sigtermed_run_is_killed_in_mlflow_not_left_running_and_resumes(tmp_path, tiny_data):
    # Before: SIGTERM ended the process where it stood; its MLflow run said RUNNING forever.
    import mlflow

    uri, run_dir, command, first = _tracked_run_past_its_first_checkpoint(tmp_path, tiny_data)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert re.match(r"cocomix: stopped by SIGTERM after step \d+: checkpoint step_\d+ written; the run is marked KILLED",
                    err.strip().splitlines()[-1]), err[-2000:]
    client = mlflow.MlflowClient(uri)
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "KILLED"
    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-2000:]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_environment_records_every_package_that_shapes_a_result():
    import importlib.metadata

    env = records.environment_info()
    for name in ("tokenizers", "datasets", "lm_eval", "mlflow", "optuna", "snakemake", "safetensors", "numpy"):
        assert env[name] == importlib.metadata.version(name), name
    assert env["torch"] and env["transformers"] and env["git_commit"]


@pytest.mark.slow
def test_a_sigkilled_run_whose_folder_is_superseded_is_ended_killed_not_left_running(tmp_path, tiny_data):
    # A SIGKILL leaves the tracked run RUNNING (no handler runs). Resumed, it continues and ends FINISHED;
    # but rerun with another config, its folder moves to superseded-1 and a new run starts: the old one
    # said RUNNING for ever. Now the next start ends it KILLED.
    import mlflow

    uri, run_dir, command, first = _tracked_run_past_its_first_checkpoint(tmp_path, tiny_data)
    first.kill()
    first.communicate()
    client = mlflow.MlflowClient(uri)
    old_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(old_id).info.status == "RUNNING"
    second = subprocess.run(command + ["train.lr=1e-3", "train.tokens=10240"], env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (run_dir / "superseded-1" / "mlflow_run_id").read_text() == old_id
    new_id = (run_dir / "mlflow_run_id").read_text()
    assert new_id != old_id
    assert client.get_run(old_id).info.status == "KILLED" and client.get_run(new_id).info.status == "FINISHED"
