"""The node a SLURM profile declares, and what each training job asks of it.

The profile declares one node of its partition, once, as three default resources
(workflow/profiles/slurm/config.yaml):

    default-resources: [node_gpus=8, node_cpus=64, node_mem_mb=480000]

and how many of them a training job takes (`set-resources: train:nodes=1`). A training job then takes
whole nodes:

- one node: `sbatch --nodes=1 --gpus=8 --cpus-per-task=64 --mem 480000`, one task whose
  `python -m cocomix.launch --gpus 8` runs torchrun with 8 processes of 64 / 8 threads each;
- N nodes: the plugin's MPI route (an `mpi` resource: its job step runs the rule's shell command on
  the batch host instead of wrapping it in `srun -n1 --nodes=1`), `sbatch --nodes=N --gpus=8N
  --ntasks-per-node=8 --cpus-per-task=8 --mem 480000` (memory per node), and cocomix.launch starts
  one torchrun agent per node with `srun --ntasks-per-node=1 --cpus-per-task=64`.

Planning refuses, in one line, a profile whose jobs a node cannot hold (`check_jobs`). Pure functions
of plain values; the Snakefile reads them from Snakemake (`cocomix.dag.declared_node`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cocomix.config import ConfigError

NODE_KEYS = ("node_gpus", "node_cpus", "node_mem_mb")


@dataclass(frozen=True)
class Node:
    gpus: int
    cpus: int
    mem_mb: int


def node_from(values: dict[str, object]) -> Node | None:
    """The declared node from the profile's default resources, None if the profile declares none (the
    local and gpu profiles). All three keys or none, each a positive integer."""
    given = {k: values.get(k) for k in NODE_KEYS if values.get(k) is not None}
    if not given:
        return None
    missing = [k for k in NODE_KEYS if k not in given]
    if missing:
        raise ConfigError(f"profile default-resources: declare the node with all of {', '.join(NODE_KEYS)}; "
                          f"missing {', '.join(missing)}")
    for key, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"profile default-resources: {key} must be a positive integer, got {value!r}")
    return Node(given["node_gpus"], given["node_cpus"], given["node_mem_mb"])


def train_resources(node: Node | None, nodes: int | None) -> dict[str, object]:
    """The resources of a training job: one GPU without a declared node (a workstation), else `nodes`
    whole nodes as the module docstring says."""
    if node is None:
        return {"gpu": 1}
    nodes = nodes or 1
    if nodes < 1:
        raise ConfigError(f"profile set-resources: train:nodes must be >= 1, got {nodes}")
    if nodes == 1:
        return {"nodes": 1, "gpu": node.gpus, "cpus_per_task": node.cpus, "mem_mb": node.mem_mb}
    if node.gpus < 2 or node.cpus < node.gpus:
        raise ConfigError(f"profile set-resources: train:nodes={nodes} needs node_gpus >= 2 and node_cpus >= "
                          f"node_gpus (the SLURM plugin's MPI route asks for node_gpus tasks per node); the node "
                          f"has {node.gpus} GPUs and {node.cpus} CPUs")
    return {"nodes": nodes, "gpu": nodes * node.gpus, "tasks_per_node": node.gpus,
            "cpus_per_task": node.cpus // node.gpus, "mem_mb": node.mem_mb, "mpi": "srun"}


def extract_resources(node: Node | None, visible_gpus: int | None, allowed_gpus: int | None) -> dict[str, object]:
    """The label-extraction job's resources: every GPU of its node (one process per GPU under torchrun,
    cocomix/concepts.py). With a declared node: one whole node; else the visible GPUs, no more than
    `--resources gpu=N` allows; one slot on a machine without GPUs."""
    if node is not None:
        return train_resources(node, 1)
    gpus = max(1, visible_gpus or 0)  # None: no GPU visible (local_gpu_slots)
    return {"gpu": min(gpus, allowed_gpus) if allowed_gpus else gpus}


def agent_cpus(resources) -> int | None:
    """CPUs of one node's torchrun agent: the job's CPUs per node (tasks per node x CPUs per task)."""
    get = resources.get if hasattr(resources, "get") else (lambda k, d=None: getattr(resources, k, d))
    cpus = get("cpus_per_task", None)
    return int(cpus) * int(get("tasks_per_node", None) or 1) if isinstance(cpus, int) and cpus > 0 else None


def check_jobs(node: Node, jobs: dict[str, dict[str, object]]) -> None:
    """Every rule's resources fit the declared node: GPUs, CPUs and memory per node. `jobs` maps a rule
    to the integer resources it asks for (rule, profile and defaults merged); one ConfigError line
    naming the rule, the resource and the node's size otherwise."""
    for rule, res in sorted(jobs.items()):
        nodes = res.get("nodes") or 1
        per_node = {
            "gpu": (res.get("gpu") or 0) / nodes,
            "cpus_per_task": (res.get("cpus_per_task") or 0) * (res.get("tasks_per_node") or 1),
            "mem_mb": res.get("mem_mb") or 0,
        }
        limits = {"gpu": ("node_gpus", node.gpus), "cpus_per_task": ("node_cpus", node.cpus),
                  "mem_mb": ("node_mem_mb", node.mem_mb)}
        for key, need in per_node.items():
            name, have = limits[key]
            if need > have:
                what = f"{res.get(key)} {key} over {nodes} node(s)" if nodes > 1 else f"{key}={res.get(key)}"
                raise ConfigError(f"profile: rule {rule} asks for {what}, more than the declared node holds "
                                  f"({name}={have}); lower it, or declare the node your partition has")
