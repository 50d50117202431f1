"""The SLURM profile as the installed snakemake-executor-plugin-slurm submits it: every job of the paper
DAG (resources resolved by Snakemake itself in a dry run with `--profile slurm`) through the plugin's own
`get_submit_command` and `set_gres_string`; and a stop signal delivered as SLURM delivers it (to every
process of the job) to a job started by cocomix.launch."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, tiny_overrides
from cocomix.checkpoints import list_checkpoints
from cocomix.config import load_config
from cocomix.launch import rank_threads

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROFILE = ROOT / "workflow/profiles/slurm/config.yaml"


class Resources(dict):
    """A job's resources as the plugin reads them (`.get(...)` and attributes)."""

    __getattr__ = dict.get


def _parse(value: str):
    value = value.strip()
    if value.startswith(("'", '"')) and value.endswith(value[0]):
        return value[1:-1]
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def plan(tmp_path: Path, config: Path, profile: Path = PROFILE.parent) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", str(profile), "--snakefile",
                           str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--config", f"config={config}"],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


def edited_profile(tmp_path: Path, edit) -> Path:
    """A copy of the slurm profile with `edit(profile_dict)` applied."""
    profile = yaml.safe_load(PROFILE.read_text())
    edit(profile)
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def dry_run_jobs(tmp_path: Path, config: Path, profile: Path = PROFILE.parent) -> list[SimpleNamespace]:
    """(rule, resources, threads, shell command) of every job Snakemake plans for `config` under the
    slurm profile."""
    proc = plan(tmp_path, config, profile)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if not m or not res:
            continue
        resources = Resources()
        for item in re.split(r", (?=\w+=)", res.group(1)):
            key, value = item.split("=", 1)
            resources[key] = _parse(value)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append(SimpleNamespace(name=m.group(1), resources=resources, threads=int(threads.group(1)) if threads else 1,
                                    is_group=lambda: False, shell=shell.group(1) if shell else ""))
    return jobs


def submit(job) -> str:
    from snakemake_executor_plugin_slurm import ExecutorSettings
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    profile = yaml.safe_load(PROFILE.read_text())
    settings = ExecutorSettings(requeue=bool(profile.get("slurm-requeue")))
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": f"rule_{job.name}", "account": "-A acct",
              "partition": "-p gpu", "workdir": "/work"}
    return get_submit_command(job, params, settings=settings) + set_gres_string(job)


def test_the_paper_dags_training_job_asks_for_one_whole_node_and_a_warning_signal(tmp_path):
    # Before: `sbatch ... --mem 512000 --ntasks-per-gpu=1 --cpus-per-task=64 ... --gpus=8`: 8 tasks of 64
    # CPUs (512), no --nodes, so 8 GPUs never met on one node; no --signal and no requeue.
    jobs = dry_run_jobs(tmp_path, ROOT / "config/paper.yaml")
    rules = {j.name for j in jobs}
    assert {"train", "prepare_data", "extract_concepts", "evaluate"} <= rules, rules
    trains = [j for j in jobs if j.name == "train"]
    assert len(trains) == 19
    for job in trains:
        call = submit(job)
        assert "--nodes=1" in call and call.endswith(" --gpus=8"), call
        assert "--ntasks-per-gpu" not in call and "--ntasks=" not in call, call
        assert "--cpus-per-task=64" in call and "--mem 480000" in call, call
        assert "--signal=USR1@300" in call and "--requeue" in call, call
        assert re.search(r" -t '?(\d+)'?", call) and int(re.search(r" -t '?(\d+)'?", call).group(1)) <= 2880
    for job in jobs:
        if job.name in ("evaluate", "train_sae"):  # one GPU each, the profile's defaults
            call = submit(job)
            assert call.endswith(" --gpus=1") and "--ntasks" not in call and "--cpus-per-task=8" in call, call
        elif job.name == "extract_concepts":  # labels over the whole node: one process per GPU
            call = submit(job)
            assert "--nodes=1" in call and call.endswith(" --gpus=8") and "--cpus-per-task=64" in call, call
            assert "-m cocomix.launch --gpus 8 extract-concepts" in job.shell, job.shell
        elif job.name == "prepare_data":  # CPU only: one task
            call = submit(job)
            assert "--ntasks=1" in call and "--gpus" not in call and "--mem 64000" in call, call
    assert {"evaluate", "extract_concepts", "prepare_data"} <= rules


def test_each_rank_gets_its_share_of_the_jobs_threads():
    # Every rank took OMP_NUM_THREADS=64 (the job's): 8 ranks x 64 threads on 64 CPUs.
    assert rank_threads(8, {"OMP_NUM_THREADS": "64"}) == {"OMP_NUM_THREADS": "8"}
    assert rank_threads(2, {"OMP_NUM_THREADS": "1"}) == {"OMP_NUM_THREADS": "1"}
    # In a SLURM step the task's CPUs decide (srun --cpus-per-task=64 of a node's agent), whatever
    # thread count the Snakemake of the job step passed (it caps the rule's threads at its cores).
    assert rank_threads(8, {"SLURM_CPUS_PER_TASK": "64", "OMP_NUM_THREADS": "8"}) == {"OMP_NUM_THREADS": "8"}


@pytest.mark.slow
def test_a_two_node_training_job_takes_two_whole_nodes_through_the_plugins_mpi_route(tmp_path):
    # Before: the plugin's job step ran every job as `srun -n1 ... --nodes=1`, so cocomix.launch always
    # took its one-node branch and a 2-node job became 16 processes on one node. Now a job of N nodes
    # carries the plugin's `mpi` resource: its job step runs the rule's command as it is, on the batch
    # host, and cocomix.launch srun-s one torchrun agent per node with the node's CPUs.
    profile = edited_profile(tmp_path, lambda p: p["set-resources"].__setitem__(0, "train:nodes=2"))
    jobs = dry_run_jobs(tmp_path / "run", ROOT / "config/paper.yaml", profile)
    trains = [j for j in jobs if j.name == "train"]
    assert len(trains) == 19
    for job in trains:
        call = submit(job)
        assert "--nodes=2" in call and call.endswith(" --gpus=16"), call
        assert "--ntasks-per-node=8" in call and "--cpus-per-task=8" in call and "--mem 480000" in call, call
        assert "--ntasks-per-gpu" not in call and "--signal=USR1@300" in call and "--requeue" in call, call
        assert job.resources["mpi"] == "srun"  # the jobstep plugin's `if "mpi" in job.resources` branch
        assert "-m cocomix.launch --gpus 16 --nodes 2 --cpus-per-node 64 train" in job.shell, job.shell
    # Evaluation still takes one GPU, label extraction one whole node (never 2: its chunks need no more).
    assert all(submit(j).endswith(" --gpus=1") for j in jobs if j.name == "evaluate")
    assert all(submit(j).endswith(" --gpus=8") and "--nodes=1" in submit(j) for j in jobs if j.name == "extract_concepts")


def test_the_training_job_takes_its_cpus_memory_and_gpus_from_the_declared_node(tmp_path):
    def smaller(p):
        p["default-resources"] = [r for r in p["default-resources"] if not r.startswith("node_")] + [
            "node_gpus=4", "node_cpus=32", "node_mem_mb=240000"]

    jobs = dry_run_jobs(tmp_path / "run", ROOT / ".test/config.yaml", edited_profile(tmp_path, smaller))
    trains = [j for j in jobs if j.name == "train"]
    assert trains
    for job in trains:
        call = submit(job)
        assert "--nodes=1" in call and call.endswith(" --gpus=4") and "--cpus-per-task=32" in call, call
        assert "--mem 240000" in call and "--ntasks-per-gpu" not in call, call
        assert "-m cocomix.launch --gpus 4 train" in job.shell, job.shell


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["set-resources"].append("extract_concepts:cpus_per_task=128"),
     "profile: rule extract_concepts asks for cpus_per_task=128, more than the declared node holds (node_cpus=64); lower it, "
     "or declare the node your partition has"),
    (lambda p: p["set-resources"].append("train_sae:gpu=16"),
     "profile: rule train_sae asks for gpu=16, more than the declared node holds (node_gpus=8); lower it, or declare "
     "the node your partition has"),
    (lambda p: p["set-resources"].append("train:mem_mb=960000"),
     "profile: rule train asks for mem_mb=960000, more than the declared node holds (node_mem_mb=480000); lower it, "
     "or declare the node your partition has"),
    (lambda p: p["default-resources"].remove("node_cpus=64"),
     "profile default-resources: declare the node with all of node_gpus, node_cpus, node_mem_mb; missing node_cpus"),
], ids=["cpus", "gpus", "memory", "half-declared"])
def test_a_profile_whose_node_cannot_hold_a_job_is_refused_at_planning_in_one_line(tmp_path, edit, message):
    profile = edited_profile(tmp_path, edit)
    proc = plan(tmp_path / "run", ROOT / ".test/config.yaml", profile)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == f"cocomix: error: {message}", proc.stderr[-2000:]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own: a process group
    signal misses them, a SLURM step's cgroup does not)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for c in map(int, out) for p in (c, *descendants(c))]


@pytest.mark.slow
def test_sigusr1_to_every_process_of_a_launched_job_checkpoints_one_step_and_the_rerun_resumes(tmp_path, tiny_data):
    # SLURM's --signal=USR1@300 reaches every process of the job step: torchrun's agent died of it (it
    # handles TERM/INT/HUP/QUIT only) and took the workers with it, no checkpoint. cocomix.launch makes
    # the agent ignore it; both workers finish the same step, checkpoint it and exit 138.
    extra = ["train.tokens=40960", "train.log_every_steps=2", "eval.every_tokens=20480", "checkpoint.every_tokens=40960"]
    args = tiny_overrides(tmp_path, tiny_data, *extra)
    run_dir = load_config(ROOT / "config/tiny.yaml", args).run_dir
    cmd = [sys.executable, "-m", "cocomix.launch", "--gpus", "2", "train", "--config", str(ROOT / "config/tiny.yaml"),
           "--no-progress", *args]
    env = {**ENV, "OMP_NUM_THREADS": "2", "MASTER_PORT": "29533"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and sum('"train/loss"' in x for x in log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # as slurmstepd signals a step: every process in it
        os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 138 and "Traceback" not in err, (proc.returncode, err[-3000:])  # the workers' status
    # Both workers exit 138 once the checkpoint is written; the one that is still shutting down when
    # torchrun sees the other gone may be ended by torchrun's SIGTERM (-15: seen under CI load). The
    # job's status is the stop signal's either way.
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"cocomix.launch: 2 of the job's processes failed \(rank: exit status \{0: (138|-15), 1: (138|-15)\}\); "
                     r"each said why above", last)
    assert m and "138" in m.groups(), last
    steps = set(re.findall(r"cocomix: stopped by SIGUSR1 after step (\d+): checkpoint step_\d+ written", err))
    said = {2} if m.groups() == ("138", "138") else {1, 2}  # a rank torchrun ended may not have said it
    assert len(steps) == 1 and err.count("cocomix: stopped by SIGUSR1") in said, err[-3000:]  # one step
    step = int(steps.pop())
    assert [c.name for c in list_checkpoints(run_dir)] == [f"step_{step:07d}"]
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and f"checkpoints/step_{step:07d}" in rerun.stdout, rerun.stderr[-3000:]
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 40


def test_label_extraction_takes_every_gpu_of_its_node_and_one_slot_without_gpus():
    # Without a GPU, local_gpu_slots() is None: the DAG's extraction job asked max(1, None) and every
    # real DAG run on a CPU failed at planning (TypeError in workflow/rules/common.smk).
    from cocomix.cluster import Node, extract_resources

    assert extract_resources(None, None, None) == {"gpu": 1}
    assert extract_resources(None, 8, None) == {"gpu": 8} and extract_resources(None, 8, 4) == {"gpu": 4}
    assert extract_resources(Node(8, 64, 480000), None, None) == {"nodes": 1, "gpu": 8, "cpus_per_task": 64,
                                                                 "mem_mb": 480000}
