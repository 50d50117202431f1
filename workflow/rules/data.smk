rule prepare_data:
    """Corpus -> tokenizer -> token shards + manifest (written last)."""
    output:
        manifest=f"{EXP}/data/manifest.json",
    log:
        f"{EXP}/logs/prepare_data.log",
    threads: workflow.cores
    shell:
        "{COCOMIX} prepare-data --config {CONFIG} > {log} 2>&1"
