rule train:
    """One (method, scale, seed) run. Killed and rerun, it resumes from its latest checkpoint:
    only final_metrics.json (and, with dag.evaluate_in_train, eval_summary.json: the job then
    evaluates every checkpoint itself, as the evaluate rule would) are the rule's outputs, so
    Snakemake never deletes the checkpoints. Inputs: the data and whatever the run's method needs
    (Dag.train_inputs)."""
    # lint: no conda/container and OFFLINE/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        lambda wc: PLAN.train_inputs(wc.run),
    output:
        PLAN.train_outputs(),
    params:
        fingerprint=lambda wc: PLAN.fingerprint(wc.run),
        overrides=lambda wc: PLAN.overrides(wc.run),
        # --tuned (dag.tuned) and a compute-matched arm's --match-flops (dag.compute_matched)
        run_flags=lambda wc: PLAN.run_flags(wc.run),
        # Several GPUs in one job (SLURM profile): DDP through cocomix.launch, same global batch; on
        # several nodes one torchrun agent per node with the node's CPUs (cocomix/cluster.py).
        launcher=lambda wc, resources: PLAN.launcher(resources.gpu, getattr(resources, "nodes", 1) or 1,
                                                      agent_cpus(resources)),
    log:
        f"{EXP}/logs/train/{{run}}.log",
    benchmark:
        f"{EXP}/benchmarks/train/{{run}}.tsv"
    wildcard_constraints:
        run="[^/]+",
    threads: NODE.cpus if NODE else GPU_THREADS
    priority: lambda wc: PLAN.priority(wc.run)
    resources:
        # one GPU; with a declared node (SLURM profile) whole nodes: nodes, gpu, cpus_per_task, mem_mb
        # (and on several nodes the plugin's MPI route: mpi, tasks_per_node), cocomix/cluster.py
        **TRAIN_RESOURCES,
        # SLURM time limit from the run's FLOPs (a job stopped at it is resubmitted and resumes)
        runtime=lambda wc: PLAN.runtime_minutes(wc.run),
    shell:
        "OMP_NUM_THREADS={threads} {OFFLINE} {params.launcher} train --config {CONFIG} --no-progress "
        "{TRAIN_FLAGS}{params.run_flags} {params.overrides} > {log} 2>&1"
