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


# Equal tuning (cocomix/tune.py): with dag.tuned every main run of a method waits for its study, and
# trains with the values it chose. Also by name: snakemake tuning/<method>/best.json targets, or
# `cocomix tune --config ...` for every method.
rule tune:
    """One method's tuning study: tune.n_trials trials of tune.tokens tokens, scored on the tuning split
    (eval.split: tune), never on validation -> <experiment>/tuning/<method>/best.json."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        lambda wc: PLAN.tune_inputs(wc.method),
    output:
        f"{EXP}/tuning/{{method}}/best.json",
    params:
        fingerprint=lambda wc: PLAN.tune_fingerprint(wc.method),
    log:
        f"{EXP}/logs/tune/{{method}}.log",
    benchmark:
        f"{EXP}/benchmarks/tune/{{method}}.tsv"
    wildcard_constraints:
        method="[^/]+",
    threads: GPU_THREADS
    priority: 3
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {COCOMIX} tune --config {CONFIG} --method {wildcards.method} > {log} 2>&1"
