"""Optuna sweeps (cocomix/sweep.py): parallel workers on one storage, pruning, a killed sweep that
continues the same study, failed trials, MLflow nesting, and a best config that trains as it is."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cocomix.config import ConfigError, load_config
from conftest import ROOT, cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def sweep_overrides(concept_cache, tmp_path: Path, study: str, *extra: str) -> list[str]:
    """Tiny trials (3-layer student, so insert_layer has two values) of 40,960 tokens with a held-out
    point every 10,240 tokens, on the shared label cache; MLflow in the test's own sqlite store."""
    _, overrides = concept_cache
    return overrides + [
        "model.n_layer=3", "train.tokens=40960", "eval.every_tokens=10240", "checkpoint.every_tokens=10240",
        "eval.max_blocks=32", "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"sweep.study={study}", f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "sweep.tokens=null", "sweep.heartbeat_s=1", "sweep.grace_s=4", "sweep.n_startup_trials=3", *extra,
    ]


def load(overrides):
    return load_config(ROOT / "config/tiny.yaml", overrides + ["method=cocomix"])


def trials(cfg):
    import optuna

    from cocomix.sweep import storage_url, study_name

    return optuna.load_study(study_name=study_name(cfg), storage=storage_url(cfg)).get_trials(deepcopy=False)


def test_search_space_defaults_and_errors(concept_cache, tmp_path):
    from cocomix.sweep import search_space

    cfg = load(sweep_overrides(concept_cache, tmp_path, "s"))
    space = search_space(cfg)
    assert (space["concept.insert_layer"].low, space["concept.insert_layer"].high) == (1, 2)  # n_layer 3
    assert (space["concept.k"].low, space["concept.k"].high, space["concept.k"].log) == (2, 32, True)  # k=8
    bad = {
        "sweep.space={concept.lamda: {type: float, low: 0.01, high: 1}}": "'concept.lamda' is not a config key",
        "sweep.space={concept.lam: {type: float, low: 1, high: 0.1}}": "needs low <= high",
        "sweep.space={concept.insert_layer: {type: int, low: 0, high: 2}}": "must lie in 1..2",
        "sweep.space={concept.k_attr: {type: categorical}}": "non-empty 'choices'",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            search_space(load(sweep_overrides(concept_cache, tmp_path, "s", override)))


@pytest.mark.slow
def test_sweep_two_workers_prunes_survives_a_kill_and_tracks_in_mlflow(concept_cache, tmp_path):
    import mlflow
    from optuna.trial import TrialState

    overrides = sweep_overrides(concept_cache, tmp_path, "s2", "sweep.n_trials=8", "sweep.workers=2")
    cfg = load(overrides)
    cmd = cli("sweep", "--config", str(ROOT / "config/tiny.yaml"), *overrides)

    # Start the sweep; kill the whole process group (coordinator and both workers) once three
    # trials have ended and a running trial has reported a held-out point (so it has a checkpoint).
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    killed_running = []
    while time.time() < deadline:
        time.sleep(1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            ts = trials(cfg)
        except KeyError:  # study not created yet
            continue
        ended = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        running = [t for t in ts if t.state == TrialState.RUNNING and t.intermediate_values]
        if len(ended) >= 3 and running:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_running = [t.number for t in trials(cfg) if t.state == TrialState.RUNNING]
            with_checkpoint = [t.number for t in trials(cfg) if t.state == TrialState.RUNNING and t.intermediate_values]
            break
    assert killed_running, "the sweep never reached a point where it could be killed mid-trial"
    n_before = len(trials(cfg))

    time.sleep(cfg.sweep.grace_s + 1)  # the killed trials' heartbeats go stale
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    ts = trials(cfg)
    by_number = {t.number: t for t in ts}
    states = [t.state for t in ts]
    finished = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
    # 8 trials in the end; two workers finishing at the same instant may each start one more.
    assert 8 <= finished <= 9, states
    assert states.count(TrialState.PRUNED) >= 1, states
    assert states.count(TrialState.COMPLETE) >= 2, states
    assert len(ts) > n_before  # the rerun continued the same study (earlier trials are still in it)
    # The sweep prints one line per trial its workers finish (from their logs), none from the first run's
    echoed = [int(n) for n in re.findall(r"^sweep: trial (\d+) .*: val/loss \d", out.stdout, re.M)]
    new_complete = [t.number for t in ts if t.number >= n_before and t.state == TrialState.COMPLETE]
    assert set(new_complete) <= set(echoed) and all(by_number[n].state == TrialState.COMPLETE for n in echoed), out.stdout
    # Every trial killed mid-way was failed by its heartbeat and run again to the end, with the
    # parameters it had drawn. (A trial the other worker had just created when the kill came may not
    # have drawn any yet, nor named its run folder: its retry draws afresh, as a new trial would.)
    retries = {}
    for n in killed_running:
        killed = by_number[n]
        assert killed.state == TrialState.FAIL and "failure" not in killed.user_attrs
        (retries[n],) = [t for t in ts if t.system_attrs.get("failed_trial") == n]
        assert retries[n].state in (TrialState.COMPLETE, TrialState.PRUNED)
        for key, value in killed.params.items():
            assert retries[n].params[key] == value
        if "run_dir" in killed.user_attrs:
            assert retries[n].user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    # Those that had written a checkpoint (reported a held-out point) resumed from it, in the same run
    # folder and with the same parameters.
    worker_logs = "".join(p.read_text() for p in (cfg.experiment_dir / "sweeps" / "s2" / "logs").glob("*.log"))
    assert with_checkpoint
    for n in with_checkpoint:
        assert set(by_number[n].params) == {"concept.insert_layer", "concept.k"}
        assert retries[n].params == by_number[n].params
        assert retries[n].user_attrs["run_dir"] == by_number[n].user_attrs["run_dir"]
        assert f"resumed from {by_number[n].user_attrs['run_dir']}/checkpoints/" in worker_logs

    # Outputs: the trials table, plots, and a best config that `cocomix train` accepts unchanged.
    folder = cfg.experiment_dir / "sweeps" / "s2"
    rows = (folder / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(ts)
    for png in ("importance.png", "contour.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = min((t for t in ts if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    best_cfg = folder / "best_config.yaml"
    tree = yaml.safe_load(best_cfg.read_text())
    assert tree["concept"]["insert_layer"] == best.params["concept.insert_layer"]
    assert tree["concept"]["k"] == best.params["concept.k"]
    trained = subprocess.run(cli("train", "--config", str(best_cfg), "--no-progress"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = load_config(best_cfg).run_dir / "final_metrics.json"
    assert final.is_file()
    # Same config, same seed, same data order: the best trial's result is reproduced exactly.
    assert json.loads(final.read_text())["val/loss"] == pytest.approx(best.value, abs=1e-5)

    # MLflow: the sweep's parent run, every trial run nested under it, with params, curve and state.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "s2"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(best.value)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    distinct_dirs = {t.user_attrs["run_dir"] for t in ts if "run_dir" in t.user_attrs}
    assert len(children) == len(distinct_dirs)  # a retried trial continues its MLflow run
    states_in_mlflow = {r.data.tags["optuna.trial"]: r.data.tags["optuna.state"] for r in children}
    for t in ts:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert states_in_mlflow[str(t.number)] == t.state.name
            # the trials table links each trial to its MLflow run
            assert t.user_attrs["mlflow_run_id"] in {r.info.run_id for r in children}
    child = next(r for r in children if r.data.tags["optuna.state"] == "COMPLETE")
    assert {"concept.insert_layer", "concept.k"} <= set(child.data.params)
    assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 4  # 40,960 / 10,240 tokens

    # Nothing left to do: a third invocation adds no trial.
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(trials(cfg)) == len(ts)


def test_failed_trials_are_recorded_and_the_sweep_goes_on(concept_cache, tmp_path):
    from optuna.trial import TrialState

    space = ("sweep.space={train.micro_batch_size: {type: categorical, choices: [8, 7]}}")
    enqueue = ("sweep.enqueue=[{train.micro_batch_size: 7, concept.insert_layer: 1, concept.k: 8},"
               " {train.micro_batch_size: 8, concept.insert_layer: 1, concept.k: 8}]")
    overrides = sweep_overrides(concept_cache, tmp_path, "fail", "sweep.n_trials=2", "sweep.workers=1",
                                "train.tokens=10240", "tracking.enabled=false", space, enqueue)
    out = subprocess.run(cli("sweep", "--config", str(ROOT / "config/tiny.yaml"), *overrides), env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 complete, 0 pruned, 1 failed" in out.stdout
    t0, t1 = trials(load(overrides))
    assert t0.state == TrialState.FAIL and "not a positive multiple of train.micro_batch_size=7" in t0.user_attrs["failure"]
    assert t1.state == TrialState.COMPLETE


def test_sweep_errors(concept_cache, tmp_path):
    base = sweep_overrides(concept_cache, tmp_path, "err", "sweep.n_trials=1", "tracking.enabled=false")
    config = str(ROOT / "config/tiny.yaml")
    # Joining a study that nobody created.
    out = subprocess.run(cli("sweep", "--join", "--config", config, *base), env=ENV, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"cocomix: error: no study 'err' in sqlite:///{tmp_path / 'optuna.db'}: create it first with "
        "`cocomix sweep --workers 0` (workers only join)"]
    # A study continued under another budget is refused.
    assert subprocess.run(cli("sweep", "--workers", "0", "--config", config, *base), env=ENV,
                          capture_output=True).returncode == 0
    out = subprocess.run(cli("sweep", "--workers", "0", "--config", config, *base, "train.tokens=20480"), env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1
    assert "was created with another base config, budget or search space" in out.stderr


@pytest.mark.slow
def test_a_trial_another_worker_already_runs_is_left_to_it_untold(concept_cache, tmp_path):
    """Optuna's SQLite storage can give one queued trial to two workers at once (seen in CI after a
    kill: both resumed the retried trial; the one that found its run folder locked failed it, and the
    other's result was then refused: 'Cannot tell a FAIL trial'). Now the second leaves it untold."""
    import sys

    import optuna

    from cocomix.sweep import TrialTakenElsewhere, objective_for, search_space, trial_config

    cfg = load(sweep_overrides(concept_cache, tmp_path, "taken"))
    study = optuna.create_study()
    params = {"concept.insert_layer": 1, "concept.k": 8}
    study.enqueue_trial(params)
    trial = study.ask()
    lock = trial_config(cfg, params, trial.number).run_dir / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write('pid 1 on the other worker'); f.flush(); print('locked', flush=True)\n"
                               "time.sleep(120)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrialTakenElsewhere):
            objective_for(cfg, search_space(cfg), None)(trial)
    finally:
        holder.kill()
        holder.wait()
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # nothing told: the other worker's to tell
    assert "failure" not in study.trials[0].user_attrs and not (lock.parent / "checkpoints").exists()


def test_a_storage_that_is_damaged_locked_or_lacks_its_driver_is_one_line(tmp_path, monkeypatch):
    # Each ended in a traceback before: sqlalchemy's DatabaseError, OperationalError after sqlite's 5 s,
    # optuna's ImportError.
    import sqlite3

    from cocomix import sweep as sweep_module
    from cocomix.sweep import SweepError, create_study, run_worker

    def cfg(url):
        return load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "tracking.enabled=false",
                                                       "method=cocomix", f"sweep.storage={url}"])

    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"not sqlite " * 100)
    with pytest.raises(SweepError, match=rf"^sweep.storage 'sqlite:///{damaged}': file is not a database \(damaged"):
        create_study(cfg(f"sqlite:///{damaged}"))
    with pytest.raises(SweepError, match=r"^sweep.storage 'postgresql://u@127.0.0.1/x': the database driver for it "
                                         r"is not installed \(e.g. pip install psycopg2-binary"):
        create_study(cfg("postgresql://u@127.0.0.1/x"))
    locked = f"sqlite:///{tmp_path / 'locked.db'}"
    create_study(cfg(locked))
    monkeypatch.setattr(sweep_module, "LOCK_WAIT_S", 0.5)
    holder = sqlite3.connect(tmp_path / "locked.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    try:
        start = time.monotonic()
        with pytest.raises(SweepError, match=rf"^sweep.storage '{locked}': database is locked by another process "
                                             r"after 0.5 s; let it finish or stop it"):
            run_worker(cfg(locked))
        assert time.monotonic() - start < 5  # the stated wait, not sqlite's default
    finally:
        holder.rollback()
        holder.close()


def test_workers_that_fail_the_same_stale_trials_at_once_queue_each_once(tmp_path):
    """CI, after a killed sweep: the two restarted workers both failed the killed trial (SQLite reads its
    state before either writes), so Optuna's callback queued two retries of it, two trials for one run
    folder. Here four processes fail three stale trials at the same moment: each is queued again once.
    Before the fix the callback check below always failed and the four processes queued 5-7 retries of
    the three trials in most runs."""
    import sys

    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    from cocomix.sweep import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "tracking.enabled=false", "method=cocomix",
                                                  f"sweep.storage={url}", "sweep.heartbeat_s=1", "sweep.grace_s=1"])
    storage = open_storage(cfg)
    study = optuna.create_study(study_name="stale", storage=storage)
    for _ in range(3):  # three trials whose workers died after one heartbeat
        storage.record_heartbeat(study.ask({"x": IntDistribution(0, 9)})._trial_id)
    time.sleep(2)
    # The callback itself, given the same failed trial twice (as two workers would), queues it once.
    twice = optuna.create_study(study_name="twice", storage=storage)
    trial = twice.ask({"x": IntDistribution(0, 9)})
    twice.tell(trial, state=TrialState.FAIL)
    for _ in range(2):
        storage.get_heartbeat_stale_trial_callback()(twice, twice.trials[0])
    assert [t.system_attrs.get("failed_trial") for t in twice.trials] == [None, 0]
    go = tmp_path / "go"
    script = (
        "import sys, time, warnings; warnings.simplefilter('ignore')\n"
        "from pathlib import Path\n"
        "import optuna\n"
        "from optuna.storages import fail_stale_trials\n"
        "from cocomix.config import load_config\n"
        "from cocomix.sweep import open_storage\n"
        "cfg = load_config(Path(sys.argv[1]), sys.argv[3:])\n"
        "study = optuna.load_study(study_name='stale', storage=open_storage(cfg))\n"
        "print('ready', flush=True)\n"
        "while not Path(sys.argv[2]).exists(): time.sleep(0.001)\n"
        "start = float(Path(sys.argv[2]).read_text())\n"
        "while time.time() < start: pass\n"
        "fail_stale_trials(study)\n"
    )
    args = [f"results_dir={tmp_path}", "tracking.enabled=false", "method=cocomix", f"sweep.storage={url}",
            "sweep.heartbeat_s=1", "sweep.grace_s=1"]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ROOT / "config/tiny.yaml"), str(go), *args],
                              stdout=subprocess.PIPE, text=True, env=ENV) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    (tmp_path / "go.tmp").write_text(str(time.time() + 0.5))  # all four start failing together
    os.replace(tmp_path / "go.tmp", go)  # whole: a worker must not read it half-written
    for p in procs:
        assert p.wait(timeout=60) == 0
    ts = optuna.load_study(study_name="stale", storage=url).get_trials(deepcopy=False)
    assert [t.state for t in ts[:3]] == [TrialState.FAIL] * 3
    queued = sorted(t.system_attrs["failed_trial"] for t in ts if t.state == TrialState.WAITING)
    assert queued == [0, 1, 2], queued
    for t in ts[3:]:  # each retry keeps its trial's parameters
        assert t.params == ts[t.system_attrs["failed_trial"]].params


@pytest.mark.slow
def test_a_sweep_stopped_by_sigusr1_hands_its_trial_back_with_its_checkpoint(concept_cache, tmp_path):
    # SLURM's warning before the time limit reaches every process: the worker's trial finishes its step,
    # checkpoints it and is queued again (before: the worker died mid-step, its trial FAILED for good or
    # waited out its heartbeat); the coordinator waits and says so; the rerun resumes that trial.
    from optuna.trial import TrialState

    overrides = sweep_overrides(concept_cache, tmp_path, "sig", "sweep.n_trials=2", "sweep.workers=1")
    cfg = load(overrides)
    cmd = cli("sweep", "--config", str(ROOT / "config/tiny.yaml"), *overrides)
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials(cfg)):
                break
        except KeyError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGUSR1)  # as slurmstepd signals a job step
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("cocomix: error: sweep stopped by a signal: worker 0 (exit 138"), err
    ts = trials(cfg)
    (stopped,) = [t for t in ts if t.state == TrialState.FAIL]
    (queued,) = [t for t in ts if t.state == TrialState.WAITING]
    assert queued.system_attrs["failed_trial"] == stopped.number and queued.params == stopped.params
    run_dir = Path(stopped.user_attrs["run_dir"])
    assert queued.user_attrs["run_dir"] == str(run_dir) and list((run_dir / "checkpoints").glob("step_*"))
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logs = "".join(p.read_text() for p in (cfg.experiment_dir / "sweeps" / "sig" / "logs").glob("*.log"))
    assert f"resumed from {run_dir}/checkpoints/" in logs
    states = [t.state for t in trials(cfg)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2, states
