"""The GPU and cluster launch paths that a CPU can check: one device claimed per process (lock
files per user, CUDA_VISIBLE_DEVICES narrowed before torch starts), and the torchrun / srun command
lines of cocomix.launch for one node and for a multi-node SLURM allocation."""

import os
import subprocess
import sys
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


def test_lock_files_live_in_a_folder_per_user(monkeypatch):
    # The old folder, /tmp/cocomix-gpu-locks, was shared: a second user met the first one's files
    # (PermissionError opening them for writing).
    monkeypatch.delenv("COCOMIX_GPU_LOCK_DIR", raising=False)
    assert gpus.lock_dir().name == f"cocomix-gpu-locks-{os.getuid()}"


HOLD = """
import sys, time
from cocomix import gpus
print(gpus.try_claim(sys.argv[1].split(","), __import__("pathlib").Path(sys.argv[2])), flush=True)
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


def test_claim_for_process_sets_the_one_device_and_torchrun_jobs_skip_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_held", {})
    monkeypatch.setenv("COCOMIX_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gpus.claim_for_process() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert gpus.claim_for_process() == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpus.claim_for_process() is None  # now one device is visible: nothing more to claim
    for fh in gpus._held.values():
        fh.close()


def test_one_node_runs_standalone_torchrun():
    argv = launch_argv(8, ["train", "--config", "c.yaml"], {"SLURM_JOB_NUM_NODES": "1"}, "node1", python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8",
                    "-m", "cocomix.cli", "train", "--config", "c.yaml"]
    assert launch_argv(2, ["train"], {}, "h", python="py")[3] == "--standalone"


def test_a_multi_node_slurm_allocation_starts_one_torchrun_per_node_with_a_rendezvous():
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    argv = launch_argv(16, ["train"], env, "gpu-a01", python="py")
    assert argv[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    rest = " ".join(argv[5:])
    assert rest == ("py -m torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                    "--rdzv_endpoint gpu-a01:29500 --rdzv_id 4242 -m cocomix.cli train")
    # Already inside an srun step (a user's own srun line): each task runs its torchrun standalone.
    assert "--standalone" in launch_argv(8, ["train"], {**env, "SLURM_STEP_ID": "0"}, "h", python="py")
    with pytest.raises(SystemExit, match="--gpus 9 cannot be split evenly over the allocation's 2 nodes"):
        launch_argv(9, ["train"], env, "h")


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
