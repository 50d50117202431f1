"""Run a `cocomix` command as several DDP processes: what a training job with more than one GPU runs.

    python -m cocomix.launch --gpus 8 train --config config/paper.yaml ...

`--gpus` is the job's total. On one node (a workstation, a one-node SLURM job) this is
`torchrun --standalone --nproc_per_node 8 -m cocomix.cli ...`. In a SLURM allocation of several
nodes (SLURM_JOB_NUM_NODES > 1, outside any job step) it becomes one torchrun per node started by
`srun`, each with gpus / nodes processes, meeting at a c10d rendezvous on this host (the batch
host, the allocation's first node) at port $COCOMIX_RDZV_PORT (default 29500), rendezvous id the
SLURM job id. The arguments are built from the environment without torch; on one node torchrun
then runs in this process, so a failed worker is one line and the job exits with the workers' status
(138 after a stop signal); srun replaces this process.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    env = dict(os.environ)
    cmd = launch_argv(ns.gpus, ns.args, env, socket.gethostname())
    os.environ.update(rank_threads(ns.gpus, env))
    # SLURM's warning before the time limit (the profile's --signal=USR1@300) reaches every process of
    # the step: torchrun's agent, which handles TERM/INT/HUP/QUIT only, would die of SIGUSR1 and take its
    # workers with it. Ignored here (inherited across exec), the agent lives; the workers set their own
    # handler: they finish the step, checkpoint it and exit 138.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    if cmd[0] == "srun":
        os.execvp(cmd[0], cmd)
    sys.exit(run_torchrun(cmd[3:]))


def run_torchrun(args: list[str]) -> int:
    """torchrun in this process, so that a worker's failure is one line and the workers' exit status (138
    for a stop signal) is the job's, not torchrun's ChildFailedError traceback and exit 1."""
    import runpy

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # lazy: torch only here

    sys.argv = ["torch.distributed.run", *args]
    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        print(f"cocomix.launch: {len(codes)} of the job's processes failed (rank: exit status {codes}); each "
              "said why above", file=sys.stderr, flush=True)
        return max(codes.values(), key=lambda c: (c > 128, c)) if codes else 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def rank_threads(gpus: int, env: dict[str, str]) -> dict[str, str]:
    """OMP_NUM_THREADS of each process: the job's threads (its OMP_NUM_THREADS, else this host's CPUs)
    shared by the processes on this node, not each of them taking them all (8 ranks x 64 threads)."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = gpus // nodes if "SLURM_STEP_ID" not in env and nodes > 1 else gpus
    total = int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, total // max(1, per_node)))}


if __name__ == "__main__":
    main()
