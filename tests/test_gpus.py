"""The GPU and cluster launch paths that a CPU can check: one device claimed per process (lock
files per user, CUDA_VISIBLE_DEVICES narrowed before torch starts), and the torchrun / srun command
lines of cocomix.launch for one node and for a multi-node SLURM allocation."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cocomix import gpus
from cocomix.launch import launch_argv
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_visible_devices_come_from_cuda_visible_devices_or_the_driver(tmp_path):
    assert gpus.visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5,GPU-ab12"}) == ["3", "5", "GPU-ab12"]
    assert gpus.visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:41:00.0"):
        (proc / bus).mkdir(parents=True)
    assert gpus.visible_devices({}, proc) == ["0", "1"]
    assert gpus.visible_devices({}, tmp_path / "none") == []


def test_one_lock_folder_for_every_user_of_the_machine_and_the_slurm_jobs_own(monkeypatch):
    # The folder was per user (cocomix-gpu-locks-<uid>): two users' jobs both took GPU 0.
    monkeypatch.delenv("COCOMIX_GPU_LOCK_DIR", raising=False)
    assert gpus.lock_dir({}).name == "cocomix-gpu-locks"
    # SLURM numbers every job's devices from 0 on a shared node: a job's locks are its own.
    assert gpus.lock_dir({"SLURM_JOB_ID": "4242"}).name == "cocomix-gpu-locks-slurm4242"
    assert gpus.lock_dir({"COCOMIX_GPU_LOCK_DIR": "/x/y", "SLURM_JOB_ID": "1"}) == Path("/x/y")


HOLD = """
import sys, time
from cocomix import gpus
got = gpus.try_claim_many(sys.argv[1].split(","), int(sys.argv[3]) if len(sys.argv) > 3 else 1,
                          __import__("pathlib").Path(sys.argv[2]))
print(",".join(got) if got else None, flush=True)
time.sleep(60)
"""


def test_concurrent_processes_claim_different_devices_and_the_cli_narrows_to_its_own(tmp_path):
    locks = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "5,7", str(locks)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "5"
        # A GPU subcommand claims the free device before anything else and narrows CUDA_VISIBLE_DEVICES
        # to it (here it then fails on its argument, as any bad input does).
        env = {**ENV, "CUDA_VISIBLE_DEVICES": "5,7", "COCOMIX_GPU_LOCK_DIR": str(locks)}
        proc = subprocess.run([sys.executable, "-m", "cocomix.cli", "eval", str(tmp_path / "no-run")], env=env,
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert f"cocomix: using GPU 7 of 5,7 (lock in {locks})" in proc.stderr
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        # Commands that never touch a GPU claim nothing.
        proc = subprocess.run([sys.executable, "-m", "cocomix.cli", "config"], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "using GPU" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def _hold(devices: str, folder: Path, n: int = 1, user: int | None = None) -> subprocess.Popen:
    """A process that claims `n` of `devices` in `folder` and holds them (as `user`, when given)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + HOLD
    pre = (lambda: (os.setgid(user), os.setuid(user))) if user is not None else None
    python = SYSTEM_PYTHON if user is not None else sys.executable  # ours may lie in a folder only root reads
    return subprocess.Popen([python, "-c", code, devices, str(folder), str(n)], stdout=subprocess.PIPE,
                            text=True, cwd="/", env={"PATH": os.environ["PATH"]}, preexec_fn=pre)


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # gpus.py needs the standard library only


@pytest.mark.skipif(os.getuid() != 0 or not SYSTEM_PYTHON,
                    reason="needs root (to run a process as nobody) and a system python3 in /usr/bin")
def test_two_users_jobs_never_share_a_device():
    # Before: each user had a lock folder of their own, so the second user's job took GPU 0 as well.
    # Now the folder is shared (sticky, world-writable) and root's lock file, which nobody cannot open
    # for writing, is opened read-only: flock needs no more.
    base = Path(tempfile.mkdtemp(prefix="cocomix-two-users-"))  # pytest's tmp_path is root's alone (0700)
    base.chmod(0o755)
    shared = base / "cocomix-gpu-locks"
    first = _hold("0,1", shared)
    try:
        assert first.stdout.readline().strip() == "0"
        assert shared.stat().st_mode & 0o1777 == 0o1777
        second = _hold("0,1", shared, user=65534)
        try:
            assert second.stdout.readline().strip() == "1"
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
        shutil.rmtree(base)


def test_ddp_jobs_claim_all_their_devices_or_wait(tmp_path):
    # Before: a one-node DDP job (cocomix.launch --gpus 2) took no locks and its ranks used devices 0
    # and 1 whatever ran there, so two 2-GPU jobs both landed on GPUs 0-1.
    locks = tmp_path / "locks"
    first = _hold("0,1,2,3", locks, n=2)
    try:
        assert first.stdout.readline().strip() == "0,1"
        third = _hold("0,1,2,3", locks)
        assert third.stdout.readline().strip() == "2"  # one device of the other pair is taken
        # A 2-GPU job waits (all or none: it does not take GPU 3 and sit on it) until two are free.
        env = {**ENV, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "COCOMIX_GPU_LOCK_DIR": str(locks)}
        job = subprocess.Popen([sys.executable, "-m", "cocomix.launch", "--gpus", "2", "config"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert job.stderr.readline().strip() == f"cocomix.launch: waiting for 2 free GPUs of 0,1,2,3 (locks in {locks})"
        assert gpus.try_claim_many(["3"], 1, locks) == ["3"]  # GPU 3 was left free for others
        os.close(gpus._held.pop("3"))
        third.kill()
        third.wait()
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
        assert f"cocomix.launch: using GPUs 2,3 of 0,1,2,3 (locks in {locks})" in err
        assert out.count("experiment:") == 2  # both ranks ran, on the job's two devices
    finally:
        first.kill()
        first.wait()


def test_a_launched_job_narrows_its_workers_to_the_devices_it_claimed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_held", {})
    monkeypatch.setenv("COCOMIX_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert gpus.claim_for_job(2) == ["4", "5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    for fd in gpus._held.values():
        os.close(fd)
    monkeypatch.setattr(gpus, "_held", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert gpus.claim_for_job(2) is None  # the job takes every visible device: nothing to choose


def test_a_dry_run_with_eight_gpus_plans_eight_gpu_jobs_side_by_side(tmp_path):
    # Before: the gpu profile set gpu=1, so on an 8-GPU machine one GPU job ran at a time.
    config = tmp_path / "cfg.yaml"
    config.write_text((ROOT / ".test/config.yaml").read_text())
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(8)))}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "16", "--profile", "gpu",
                           "--directory", str(tmp_path), "--config", f"config={config}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cocomix: 8 GPUs visible, up to 8 GPU jobs at once (--resources gpu=N for fewer)" in proc.stderr
    threads = {int(t) for t in re.findall(r"^rule (?:train|train_sae|extract_concepts):.*?^\s+threads: (\d+)$",
                                         proc.stdout, re.M | re.S)}
    assert "OMP_NUM_THREADS=2 " in proc.stdout and "OMP_NUM_THREADS=8 " not in proc.stdout, proc.stdout[-2000:]
    assert threads <= {2}
    # Label extraction takes every visible GPU: torchrun over 8 (before: one process, one GPU).
    assert "-m cocomix.launch --gpus 8 extract-concepts" in proc.stdout, proc.stdout[-2000:]
    # --resources gpu=N still says how many run at once.
    fewer = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "16", "--profile", "gpu",
                            "--resources", "gpu=4", "--directory", str(tmp_path), "--config", f"config={config}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fewer.returncode == 0 and "GPUs visible" not in fewer.stderr and "OMP_NUM_THREADS=4 " in fewer.stdout
    assert "-m cocomix.launch --gpus 4 extract-concepts" in fewer.stdout


def test_claim_for_process_sets_the_one_device_and_torchrun_jobs_skip_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_held", {})
    monkeypatch.setenv("COCOMIX_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gpus.claim_for_process() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert gpus.claim_for_process() == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpus.claim_for_process() is None  # now one device is visible: nothing more to claim
    for fd in gpus._held.values():
        os.close(fd)


def test_one_node_runs_standalone_torchrun():
    argv = launch_argv(8, ["train", "--config", "c.yaml"], {"SLURM_JOB_NUM_NODES": "1"}, "node1", python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8",
                    "-m", "cocomix.cli", "train", "--config", "c.yaml"]
    assert launch_argv(2, ["train"], {}, "h", python="py")[3] == "--standalone"


def test_a_multi_node_slurm_allocation_starts_one_torchrun_agent_per_node_with_a_rendezvous():
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    argv = launch_argv(16, ["train"], env, "gpu-a01", python="py")
    assert argv[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    rest = " ".join(argv[5:])
    # Each node's agent is torchrun inside cocomix.launch --agent, which ignores SIGUSR1 (srun starts it
    # afresh on each node: nothing is inherited from this process).
    assert rest == ("py -m cocomix.launch --agent --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                    "--rdzv_endpoint gpu-a01:29500 --rdzv_id 4242 -m cocomix.cli train")
    # Already inside an srun step (a user's own srun line): each task runs its torchrun standalone.
    assert "--standalone" in launch_argv(8, ["train"], {**env, "SLURM_STEP_ID": "0"}, "h", python="py")
    with pytest.raises(SystemExit, match="--gpus 9 cannot be split evenly over the job's 2 nodes"):
        launch_argv(9, ["train"], env, "h")
    # The Snakemake rule says how many nodes and CPUs (the plugin's job step hides SLURM_JOB_NUM_NODES
    # and SLURM_CPUS_PER_TASK from the command, and srun's default is one CPU per task).
    argv = launch_argv(16, ["train"], {"SLURM_JOB_ID": "7"}, "n1", python="py", nodes=2, cpus_per_node=64)
    assert argv[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=64",
                        "--kill-on-bad-exit=1"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_to_the_same_losses_as_one_agent(tmp_path, tiny_data):
    # A 2-node job emulated on this machine: the per-node command that srun would start on each node
    # (cocomix.launch's own argv, srun's prefix dropped), run twice with a localhost rendezvous, one
    # process each; against one agent with 2 processes (one node, --standalone). Same world size.
    from cocomix.config import load_config
    from conftest import tiny_overrides

    extra = ["train.tokens=8192", "train.log_every_steps=1", "eval.every_tokens=8192", "checkpoint.every_tokens=8192"]
    config = str(ROOT / "config/tiny.yaml")
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    one_args = tiny_overrides(tmp_path / "one", tiny_data, *extra)
    one = subprocess.run([sys.executable, "-m", "cocomix.launch", "--gpus", "2", "train", "--config", config,
                          "--no-progress", *one_args], env={**env, "MASTER_PORT": str(_free_port())}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two_args = tiny_overrides(tmp_path / "two", tiny_data, *extra)
    argv = launch_argv(2, ["train", "--config", config, "--no-progress", *two_args],
                       {"SLURM_JOB_ID": "emulated", "COCOMIX_RDZV_PORT": str(_free_port())}, "localhost",
                       nodes=2, cpus_per_node=1)
    agent = argv[argv.index(sys.executable):]  # what srun runs on each node
    assert agent[:5] == [sys.executable, "-m", "cocomix.launch", "--agent", "--nnodes"]
    nodes = [subprocess.Popen(agent, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    ref = _losses(load_config(config, one_args).run_dir)
    got = _losses(load_config(config, two_args).run_dir)
    assert len(ref) == 8 and [s for s, _ in got] == [s for s, _ in ref]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in ref], rel=1e-6)
    # Two processes wrote each checkpoint (one RNG state per rank): the agents met, not ran apart.
    from cocomix.checkpoints import list_checkpoints, load_trainer_state

    for run_args in (one_args, two_args):
        (last,) = list_checkpoints(load_config(config, run_args).run_dir)
        assert len(load_trainer_state(last)[0]["rng"]) == 2


def test_the_launcher_runs_a_real_two_process_job(tmp_path):
    # The launcher execs torchrun for real: `cocomix config` on 2 gloo processes prints twice.
    proc = subprocess.run([sys.executable, "-m", "cocomix.launch", "--gpus", "2", "config"], env=ENV,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("experiment:") == 2


def test_tf32_is_switched_on_for_cuda_devices_only():
    import torch

    from cocomix.device import enable_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        enable_tf32(torch.device("cuda", 0))  # only flags: no GPU needed to check them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_peak_table_knows_nvl_parts_and_devices_without_bf16():
    import warnings

    from cocomix.device import peak_for_name

    # gpu_check's peak table gave the H100 NVL the SXM part's 989 TFLOP/s and the V100 a bf16 peak it lacks.
    assert peak_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12 and peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_for_name("NVIDIA H200") == 989e12 and peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known, without bf16: no MFU and no warning
        assert peak_for_name("Tesla V100-SXM2-16GB") is None and peak_for_name("Tesla T4") is None
    with pytest.warns(UserWarning, match="unknown device 'Some GPU': no peak-FLOPs entry"):
        assert peak_for_name("Some GPU") is None


def test_environment_json_has_the_gpu_keys_null_on_a_cpu_machine(tmp_path):
    from cocomix.records import environment_info, nvidia_driver

    env = environment_info()
    assert {k: env[k] for k in ("cuda", "cudnn", "nccl", "driver", "gpu_name", "gpu_count")} == dict.fromkeys(
        ("cuda", "cudnn", "nccl", "driver", "gpu_name", "gpu_count"))
    assert env["cpu_count"] == os.cpu_count()
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs)\n")
    assert nvidia_driver(str(proc)) == "570.86.15" and nvidia_driver(str(tmp_path / "none")) is None


def test_gpu_utilization_is_none_without_a_gpu_or_its_driver():
    """nvidia-ml-py is installed here (the dev extra) but NVML finds no driver: no value, no error;
    on a CPU device it is not asked at all."""
    import torch

    import pynvml
    from cocomix.device import gpu_utilization

    try:
        pynvml.nvmlInit()
        pytest.skip("NVML starts here (a GPU driver): the no-driver path cannot be checked")
    except pynvml.NVMLError:
        pass
    assert gpu_utilization(torch.device("cpu")) is None
    assert gpu_utilization(torch.device("cuda", 0)) is None
