# Teacher -> SAE -> concept labels. Labels are computed once per way of scoring them and shared by
# every run and seed whose method reads that cache (cocomix/concepts.py, Dag.label_specs).


rule train_sae:
    """TopK SAE on the teacher's residual stream after block sae.layer."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        PLAN.data_manifest(),
        PLAN.teacher_inputs(),
    output:
        f"{EXP}/sae/metrics.json",
    params:
        fingerprint=lambda wc: PLAN.sae_fingerprint(),
    log:
        f"{EXP}/logs/train_sae.log",
    benchmark:
        f"{EXP}/benchmarks/train_sae.tsv"
    threads: GPU_THREADS
    priority: PLAN.teacher_priority  # on the teacher's chain: every label-reading run waits for it
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {COCOMIX} train-sae --config {CONFIG} --no-progress > {log} 2>&1"


rule extract_concepts:
    """Attribution labels for every train and val block, once (resumable after a kill)."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        lambda wc: PLAN.extract_inputs(wc.variant),
    output:
        f"{EXP}/concepts/{{variant}}/manifest.json",
    params:
        overrides=lambda wc: PLAN.extract_overrides(wc.variant),
        fingerprint=lambda wc: PLAN.labels_fingerprint(wc.variant),
        # over all the job's GPUs: torchrun through cocomix.launch, chunks dealt round-robin
        launcher=lambda wc, resources: PLAN.launcher(resources.gpu),
    log:
        f"{EXP}/logs/extract_concepts/{{variant}}.log",
    benchmark:
        f"{EXP}/benchmarks/extract_concepts/{{variant}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
    threads: NODE.cpus if NODE else GPU_THREADS
    priority: PLAN.teacher_priority  # on the teacher's chain: every label-reading run waits for it
    resources:
        **EXTRACT_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} {OFFLINE} {params.launcher} extract-concepts --config {CONFIG} --no-progress "
        "{params.overrides} > {log} 2>&1"
