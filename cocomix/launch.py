"""Run a `cocomix` command as several DDP processes: what a training job with more than one GPU runs.

    python -m cocomix.launch --gpus 8 train --config config/paper.yaml ...

`--gpus` is the job's total. On one node (a workstation, a one-node SLURM job) this is
`torchrun --standalone --nproc_per_node 8 -m cocomix.cli ...`. In a SLURM allocation of several
nodes (SLURM_JOB_NUM_NODES > 1, outside any job step) it becomes one torchrun per node started by
`srun`, each with gpus / nodes processes, meeting at a c10d rendezvous on this host (the batch
host, the allocation's first node) at port $COCOMIX_RDZV_PORT (default 29500), rendezvous id the
SLURM job id. No torch here: the arguments are built from the environment, then the launcher
replaces this process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

RDZV_PORT = 29500


def launch_argv(gpus: int, args: list[str], env: dict[str, str], host: str, python: str = sys.executable) -> list[str]:
    """The command that runs `cocomix <args>` on `gpus` processes in total."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    in_step = "SLURM_STEP_ID" in env  # already inside srun: one launcher per task
    torchrun = [python, "-m", "torch.distributed.run"]
    if nodes <= 1 or in_step:
        return [*torchrun, "--standalone", "--nproc_per_node", str(gpus), "-m", "cocomix.cli", *args]
    if gpus % nodes:
        raise SystemExit(f"cocomix.launch: --gpus {gpus} cannot be split evenly over the allocation's {nodes} nodes")
    port = env.get("COCOMIX_RDZV_PORT", str(RDZV_PORT))
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *torchrun, "--nnodes", str(nodes), "--nproc_per_node", str(gpus // nodes),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host}:{port}",
            "--rdzv_id", env.get("SLURM_JOB_ID", "cocomix"), "-m", "cocomix.cli", *args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cocomix.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="processes (GPUs) in total")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the cocomix command and its arguments")
    ns = parser.parse_args(argv)
    if ns.gpus < 1 or not ns.args:
        parser.error("need --gpus >= 1 and a cocomix command")
    cmd = launch_argv(ns.gpus, ns.args, dict(os.environ), socket.gethostname())
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
