rule prepare_data:
    """Corpus -> tokenizer -> token shards + manifest (written last)."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    output:
        manifest=PLAN.data_manifest(),
    log:
        f"{EXP}/logs/prepare_data.log",
    benchmark:
        f"{EXP}/benchmarks/prepare_data.tsv"
    threads: _cores()
    shell:
        "{COCOMIX} prepare-data --config {CONFIG} > {log} 2>&1"
