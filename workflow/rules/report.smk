rule report:
    """Tables (Markdown, LaTeX, CSV) and plots from every run's metrics and evaluations."""
    # lint: no conda/container and COCOMIX/CONFIG in the shell on purpose (notes in the Snakefile)
    input:
        PLAN.report_inputs(),
    output:
        PLAN.report_outputs(),
    log:
        f"{EXP}/logs/report.log",
    shell:
        "{COCOMIX} report --config {CONFIG} > {log} 2>&1"
