"""Run a `cocomix` command as several DDP processes: what a training job with more than one GPU runs.

    python -m cocomix.launch --gpus 8 train --config config/paper.yaml ...
    python -m cocomix.launch --gpus 16 --nodes 2 --cpus-per-node 64 train ...   (inside a SLURM job)

`--gpus` is the job's total. On one node (a workstation, a one-node SLURM job) this is
`torchrun --standalone --nproc_per_node 8 -m cocomix.cli ...`, run in this process; outside SLURM it
first claims 8 free devices of the visible ones (cocomix/gpus.py), so two DDP jobs on one machine
never share a GPU. On several nodes (`--nodes`, which the Snakemake rule passes from its `nodes`
resource: the SLURM plugin's job step hides SLURM_JOB_NUM_NODES; else SLURM_JOB_NUM_NODES outside
any job step) it becomes `srun --nodes=N --ntasks-per-node=1 --cpus-per-task=C` starting one agent
per node (`python -m cocomix.launch --agent`: torchrun with gpus / nodes processes), meeting at a
c10d rendezvous on this host (the batch host, the allocation's first node) at port
$COCOMIX_RDZV_PORT (default 29500), rendezvous id the SLURM job id. srun replaces this process.
The arguments are built from the environment without torch; a failed worker is one line and the job
exits with the workers' status (138 after a stop signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

RDZV_PORT = 29500


def job_nodes(env: dict[str, str], nodes: int | None = None) -> int:
    """The job's nodes: `--nodes` if given, else the allocation's outside a job step, else 1."""
    if nodes:
        return nodes
    if "SLURM_STEP_ID" in env:  # already inside srun (a user's own srun line): one launcher per task
        return 1
    return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)


def launch_argv(gpus: int, args: list[str], env: dict[str, str], host: str, python: str = sys.executable,
                nodes: int | None = None, cpus_per_node: int | None = None) -> list[str]:
    """The command that runs `cocomix <args>` on `gpus` processes in total over `nodes` nodes."""
    nodes = job_nodes(env, nodes)
    if nodes <= 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "-m", "cocomix.cli", *args]
    if gpus % nodes:
        raise SystemExit(f"cocomix.launch: --gpus {gpus} cannot be split evenly over the job's {nodes} nodes")
    port = env.get("COCOMIX_RDZV_PORT", str(RDZV_PORT))
    cpus = [f"--cpus-per-task={cpus_per_node}"] if cpus_per_node else []  # srun's default is 1 CPU per task
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
            python, "-m", "cocomix.launch", "--agent", "--nnodes", str(nodes), "--nproc_per_node", str(gpus // nodes),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host}:{port}",
            "--rdzv_id", env.get("SLURM_JOB_ID", "cocomix"), "-m", "cocomix.cli", *args]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # SLURM's warning before the time limit (the profile's --signal=USR1@300) reaches every process of
    # the step: torchrun's agent, which handles TERM/INT/HUP/QUIT only, would die of SIGUSR1 and take its
    # workers with it. Ignored here (inherited by torchrun in this process), the agent lives; the workers
    # set their own handler: they finish the step, checkpoint it and exit 138.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if argv[:1] == ["--agent"]:  # one node's agent of a multi-node job (started by srun): torchrun's arguments
        os.environ.update(rank_threads(_nproc(argv), dict(os.environ)))
        sys.exit(run_torchrun(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m cocomix.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="processes (GPUs) in total")
    parser.add_argument("--nodes", type=int, default=None, help="nodes of the SLURM job (default: its allocation's)")
    parser.add_argument("--cpus-per-node", type=int, default=None, help="CPUs of each node's agent (srun --cpus-per-task)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the cocomix command and its arguments")
    ns = parser.parse_args(argv)
    if ns.gpus < 1 or not ns.args or (ns.nodes is not None and ns.nodes < 1):
        parser.error("need --gpus >= 1, --nodes >= 1 and a cocomix command")
    env = dict(os.environ)
    cmd = launch_argv(ns.gpus, ns.args, env, socket.gethostname(), nodes=ns.nodes, cpus_per_node=ns.cpus_per_node)
    sys.stdout.flush()
    if cmd[0] == "srun":
        os.execvp(cmd[0], cmd)
    if "SLURM_JOB_ID" not in env:  # SLURM gave the job its devices; elsewhere claim them from the machine's
        from cocomix.gpus import claim_for_job  # lazy: the stdlib-only launcher imports it only on one node

        claim_for_job(ns.gpus)
    os.environ.update(rank_threads(ns.gpus, env))
    sys.exit(run_torchrun(cmd[3:]))


def _nproc(torchrun_args: list[str]) -> int:
    i = torchrun_args.index("--nproc_per_node") if "--nproc_per_node" in torchrun_args else -1
    return int(torchrun_args[i + 1]) if i >= 0 else 1


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


def rank_threads(procs: int, env: dict[str, str]) -> dict[str, str]:
    """OMP_NUM_THREADS of each process: this node's CPUs shared by the `procs` processes on it, not each
    of them taking them all (8 ranks x 64 threads). The node's CPUs: SLURM's CPUs for this task
    (SLURM_CPUS_PER_TASK, set by srun in a job step: the rule's thread count may have been capped by the
    Snakemake that runs the step), else the job's OMP_NUM_THREADS, else this host's CPUs."""
    total = int(env.get("SLURM_CPUS_PER_TASK") or env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, total // max(1, procs)))}


if __name__ == "__main__":
    main()
