# Optuna sweep of CoCoMix's concept layer and k (and whatever else sweep.space names); see
# cocomix/sweep.py. Not part of `all`; run it by name:
#
#   snakemake sweep --cores all [--config config=...]


def sweep_label_inputs():
    """The base CoCoMix label cache when the DAG builds it; otherwise the sweep extracts its own."""
    variant = str(load_config(CONFIG, ["method=cocomix"]).concept_dir.relative_to(BASE.experiment_dir / "concepts"))
    return [f"{EXP}/concepts/{variant}/manifest.json"] if variant in LABEL_SPECS else []


rule sweep:
    """sweep.workers local workers on one Optuna study; trials table, best config and plots."""
    input:
        f"{EXP}/data/manifest.json",
        teacher_inputs(),
        sae_inputs(),
        sweep_label_inputs(),
    output:
        f"{EXP}/sweeps/{study_name(load_config(CONFIG, ['method=cocomix']))}/summary.json",
    params:
        omp=lambda wc, threads: max(1, threads // max(1, BASE.sweep.workers)),
    log:
        f"{EXP}/logs/sweep.log",
    threads: workflow.cores
    resources:
        gpu=max(1, BASE.sweep.workers),
    shell:
        "OMP_NUM_THREADS={params.omp} {COCOMIX} sweep --config {CONFIG} > {log} 2>&1"
