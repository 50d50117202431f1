# A job per run that evaluates its checkpoints, unless the training jobs do it themselves
# (dag.evaluate_in_train, the default: one start-up of torch, transformers and lm-eval per run).
if not PLAN.eval_in_train:

    rule evaluate:
        """Held-out perplexity and lm-eval tasks on every checkpoint of a run (each once)."""
        # lint: no conda/container and COCOMIX/EXP in the shell on purpose (notes in the Snakefile)
        input:
            f"{EXP}/runs/{{run}}/final_metrics.json",
        output:
            f"{EXP}/runs/{{run}}/eval_summary.json",
        log:
            f"{EXP}/logs/eval/{{run}}.log",
        benchmark:
            f"{EXP}/benchmarks/eval/{{run}}.tsv"
        wildcard_constraints:
            run="[^/]+",
        threads: GPU_THREADS
        resources:
            gpu=1,
        shell:
            "OMP_NUM_THREADS={threads} {COCOMIX} eval --no-progress {EXP}/runs/{wildcards.run} > {log} 2>&1"
