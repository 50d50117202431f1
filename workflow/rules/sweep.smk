# Optuna sweep of CoCoMix's concept layer and k (and whatever else sweep.space names); see
# cocomix/sweep.py. Not part of `all`; run it by name:
#
#   snakemake sweep --cores all [--config config=...]


rule sweep:
    """sweep.workers local workers on one Optuna study; trials table, best config and plots.
    Inputs: data, teacher, SAE, and the base label cache when the DAG builds it (Dag.sweep_inputs)."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        PLAN.sweep_inputs(),
    output:
        PLAN.sweep_output(),
    params:
        omp=lambda wc, threads: PLAN.sweep_threads(threads),
    log:
        f"{EXP}/logs/sweep.log",
    benchmark:
        f"{EXP}/benchmarks/sweep.tsv"
    threads: _cores()
    resources:
        gpu=PLAN.sweep_workers(),
    shell:
        "OMP_NUM_THREADS={params.omp} {COCOMIX} sweep --config {CONFIG} > {log} 2>&1"
