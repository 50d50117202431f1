def train_inputs(wildcards):
    inputs = [f"{EXP}/data/manifest.json"]
    return inputs


rule train:
    """One (method, scale, seed) run. Killed and rerun, it resumes from its latest checkpoint:
    only final_metrics.json is the rule's output, so Snakemake never deletes the checkpoints."""
    input:
        train_inputs,
    output:
        f"{EXP}/runs/{{run}}/final_metrics.json",
    params:
        fingerprint=run_fingerprint,
        overrides=lambda wc: run_overrides(wc.run),
        # Several GPUs in one job (SLURM profile): DDP through torchrun, same global batch.
        launcher=lambda wc, resources: (
            f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {resources.gpu}"
            if resources.gpu > 1 else sys.executable
        ),
    log:
        f"{EXP}/logs/train/{{run}}.log",
    wildcard_constraints:
        run="[^/]+",
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {OFFLINE} {params.launcher} -m cocomix.cli train --config {CONFIG} --no-progress "
        "{params.overrides} > {log} 2>&1"
