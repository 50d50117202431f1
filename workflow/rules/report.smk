TABLES = ["main", "sample_efficiency", "ablations"]


def report_outputs():
    tables = [f"{EXP}/tables/{t}.{ext}" for t in TABLES for ext in ("md", "tex", "csv")]
    scales = sorted({r.scale or "base" for r in RUNS.values()})
    plots = [f"{EXP}/plots/{kind}_{s}.png" for kind in ("heldout_loss", "downstream") for s in scales]
    return tables + plots


rule report:
    """Tables (Markdown, LaTeX, CSV) and plots from every run's metrics and evaluations."""
    input:
        [f"{EXP}/runs/{name}/final_metrics.json" for name in RUNS],
        [f"{EXP}/runs/{name}/eval_summary.json" for name in RUNS] if BASE.dag.evaluate else [],
    output:
        report_outputs(),
    log:
        f"{EXP}/logs/report.log",
    shell:
        "{COCOMIX} report --config {CONFIG} > {log} 2>&1"
