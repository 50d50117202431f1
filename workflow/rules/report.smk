rule report:
    """Tables (Markdown, LaTeX, CSV) and plots from every run's metrics and evaluations."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        PLAN.report_inputs(),
    output:
        # `snakemake --report report.html` shows the CSV tables and the plots (Dag.report_entries)
        [report(path, category=category, caption=f"../report/{category.lower()}.rst") if category else path
         for path, category in PLAN.report_entries()],
    log:
        f"{EXP}/logs/report.log",
    shell:
        "{COCOMIX} report --config {CONFIG} > {log} 2>&1"
