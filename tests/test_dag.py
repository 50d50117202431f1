"""The Snakemake DAG for real (tiny `.test/` config): outputs, idempotence, targeted reruns,
resume after a kill, and dry runs of the gpu/slurm profiles and the paper's full plan."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def smk(workdir: Path, config: Path, *args: str, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--config", f"config={config}", *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    """One full run of the CI DAG, shared by the tests below."""
    work = tmp_path_factory.mktemp("dag")
    proc = smk(work, ROOT / ".test/config.yaml", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


def test_full_dag_writes_tables_and_plots(dag_run):
    exp = dag_run / "results" / "ci"
    for table in ("main", "sample_efficiency", "ablations"):
        for ext in ("md", "tex", "csv"):
            assert (exp / "tables" / f"{table}.{ext}").stat().st_size > 0
    assert (exp / "plots" / "heldout_loss_base.png").stat().st_size > 1000
    main = (exp / "tables" / "main.csv").read_text().splitlines()
    # One row per method with both seeds, each row traceable to its two MLflow runs.
    for method in ("ntp", "kd", "pause", "cocomix"):
        row = next(line for line in main if line.startswith(f"base,{method},2,"))
        assert len(row.rsplit(",", 1)[1].split()) == 2
    ablations = (exp / "tables" / "ablations.csv").read_text()
    assert "base,act_labels,1," in ablations and "base,mix_only,1," in ablations
    # The teacher, the SAE, one label cache per scoring, and an evaluation of every checkpoint.
    assert (exp / "runs" / "teacher" / "final_metrics.json").exists() and (exp / "sae" / "metrics.json").exists()
    assert {p.name for p in (exp / "concepts").iterdir()} == {"attribution-sequence_mean-k4", "activation-sequence_mean-k4"}
    for run in (exp / "runs").iterdir():
        if run.name != "teacher":
            assert all((c / "eval.json").exists() for c in (run / "checkpoints").iterdir()), run


def test_second_invocation_does_nothing(dag_run):
    proc = smk(dag_run, ROOT / ".test/config.yaml", "--cores", "2", "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_sweep_target_reuses_the_dags_data_teacher_sae_and_labels(dag_run):
    """`snakemake sweep` is not part of `all`; after the DAG, it plans the sweep job alone."""
    proc = smk(dag_run, ROOT / ".test/config.yaml", "--cores", "2", "-n", "sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned_jobs(proc.stdout) == {("sweep", None)}


def test_changing_one_setting_reruns_only_what_reads_it(dag_run, tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg.setdefault("kd", {})["lam"] = 0.5  # no NTP run reads kd.*
    other = tmp_path / "kd.yaml"
    other.write_text(yaml.safe_dump(cfg))
    proc = smk(dag_run, other, "--cores", "2", "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The KD branch (its two training runs and their evaluations) and the report; nothing else.
    assert planned_jobs(proc.stdout) == {("train", "kd-base-s0"), ("train", "kd-base-s1"), ("evaluate", "kd-base-s0"),
                                         ("evaluate", "kd-base-s1"), ("report", None), ("all", None)}
    cfg["train"]["lr"] = 1.0e-3  # every run reads train.*
    other.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(smk(dag_run, other, "--cores", "2", "-n").stdout)
    assert ("train", "ntp-base-s0") in jobs and ("train", "cocomix-base-s1") in jobs
    # The teacher is an NTP run too, so its SAE and labels follow; the data do not depend on train.*.
    assert ("train", "teacher") in jobs and ("train_sae", None) in jobs
    assert "prepare_data" not in {rule for rule, _ in jobs}


def planned_jobs(dry_run: str) -> set[tuple[str, str | None]]:
    """(rule, run wildcard) of every job a dry run would execute."""
    import re

    jobs, rule = set(), None
    for line in dry_run.splitlines():
        m = re.match(r"\s*(?:local)?rule (\w+):", line)
        if m:
            if rule is not None:
                jobs.add((rule, None))
            rule = m.group(1)
            continue
        m = re.match(r"\s*wildcards: .*run=([^,\s]+)", line)
        if m and rule is not None:
            jobs.add((rule, m.group(1)))
            rule = None
        elif line.strip().startswith(("Job stats", "job ")) and rule is not None:
            jobs.add((rule, None))
            rule = None
    if rule is not None:
        jobs.add((rule, None))
    return jobs


def test_killed_snakemake_resumes_training(tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["dag"] = {"methods": ["ntp"], "seeds": [0]}
    cfg["train"]["tokens"] = 131072  # long enough to kill in the middle
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path), "--config", f"config={config}", "--cores", "2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = tmp_path / "results" / "ci" / "runs" / "ntp-base-s0" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.startswith("step_") and "tmp" not in p.name
                                                                  for p in ckpts.iterdir())):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its training job, as a preemption would
    proc.wait()
    assert not (ckpts.parent / "final_metrics.json").exists()
    # A hard kill leaves Snakemake's lock behind: the documented recovery is --unlock, then rerun.
    unlock = subprocess.run(cmd + ["--unlock"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    rerun = subprocess.run(cmd + ["--rerun-incomplete"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (tmp_path / "results" / "ci" / "logs" / "train" / "ntp-base-s0.log").read_text()
    assert "resumed from" in log and "step_00000" in log


@pytest.mark.parametrize("args", [["--profile", "gpu"], ["--profile", "slurm"]], ids=["gpu", "slurm"])
def test_profile_dry_runs(tmp_path, args):
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--config", f"config={ROOT / '.test/config.yaml'}", "-n", *args],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if args[1] == "slurm":
        assert "torch.distributed.run --standalone --nproc_per_node 8" in proc.stdout


def test_paper_config_plans_the_full_dag(tmp_path):
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--config", f"config={ROOT / 'config/paper.yaml'}",
                           "-n", "--cores", "1"], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train" in proc.stdout
