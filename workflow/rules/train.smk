def train_inputs(wildcards):
    """Data for every run; the teacher for methods that read it online (KD); the label cache for
    CoCoMix runs (which is what needs teacher and SAE)."""
    inputs = [f"{EXP}/data/manifest.json"]
    if wildcards.run == "teacher":
        return inputs
    spec = RUNS[wildcards.run]
    cfg = spec.config(CONFIG)
    variant = label_variant(spec)
    if variant is not None:
        inputs.append(f"{EXP}/concepts/{variant}/manifest.json")
    elif "teacher" in get_method(cfg.method).uses:
        inputs += teacher_inputs() + (sae_inputs() if cfg.method == "cocomix" else [])
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
