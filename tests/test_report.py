"""`cocomix report` on fabricated run folders (no training): the tables' numbers and their +- against
an independent computation, the differences to NTP paired by seed, LaTeX that compiles on a page,
and the plots' curve aggregation as numbers."""

import csv
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT

METHODS = ["ntp", "kd", "pause", "cocomix"]
TOKENS = [1000, 2000, 3000, 4000]
CKPT_TOKENS = [2000, 4000]  # checkpoints with an eval.json
# Final held-out loss per (label, seed): the ablation runs only seed 0, so its difference to NTP
# paired by seed (2.95 - 3.00) differs from the difference of means (2.95 - 3.05).
FINAL_LOSS = {("ntp", 0): 3.00, ("ntp", 1): 3.10, ("kd", 0): 2.98, ("kd", 1): 3.11, ("pause", 0): 3.02,
              ("pause", 1): 3.07, ("cocomix", 0): 2.90, ("cocomix", 1): 3.06, ("act_labels", 0): 2.95,
              ("mix_only", 0): 3.01, ("token_readout", 0): 3.04}
PAPER_VALUES = ["lambada_openai/perplexity", "wikitext/word_perplexity", "hellaswag/acc_norm", "piqa/acc",
                "social_iqa/acc", "arc_easy/acc", "winogrande/acc", "synth_topic/acc", "synth_recall/acc"]


TEACHER_LOSS = 2.40
SAE_METRICS = {"fvu": 0.0272, "l0": 16.0, "dead_fraction": 0.0, "loss_increase": 0.0808, "recovery/best_auroc": 0.8735,
               "recovery/untrained_best_auroc": 0.7088, "recovery/random_auroc": 0.5000, "recovery/top8_auroc": 0.9312,
               "recovery/untrained_top8_auroc": 0.8102, "mlflow_run_id": "id-sae"}


def _curve(label: str, seed: int) -> list[tuple[int, float]]:
    """Held-out loss falling to FINAL_LOSS at the last point; a per-seed wiggle at the others."""
    final = FINAL_LOSS[(label, seed)]
    return [(t, final + 0.6 * (TOKENS[-1] / t - 1) + 0.01 * seed * (t != TOKENS[-1])) for t in TOKENS]


def _diagnostics(label: str, seed: int, tokens: int) -> dict[str, float]:
    """Fabricated read-out diagnostics (cocomix/diagnostics.py) of the interleaving variants: pause has
    no concept code, mix_only no concept labels (so no concept accuracy)."""
    if label in ("ntp", "kd"):
        return {}
    out = {"val/readout_self_attn": 0.02 + 0.01 * seed + tokens / 1e5 + 0.001 * len(label),
           "val/readout_self_attn_uniform": 0.021}
    if label != "pause":
        out["val/loss_no_concept"] = FINAL_LOSS[(label, seed)] + 0.5 + 0.1 * seed + tokens / 1e4
    if label not in ("pause", "mix_only"):
        out["val/concept_acc"] = 0.1 + 0.05 * seed + tokens / 1e5
    return out


def _metrics(label: str, seed: int, tokens: int) -> dict[str, float]:
    """Deterministic fabricated eval metrics, each with an lm-eval-style standard error."""
    rng = np.random.default_rng(sum(map(ord, label)) * 1000 + seed * 10 + tokens // 1000)
    out = {"val_loss": FINAL_LOSS[(label, seed)], "val_ppl": math.exp(FINAL_LOSS[(label, seed)]) + 0.1 * tokens / 4000}
    for key in PAPER_VALUES:
        if key.endswith("perplexity"):
            value = float(rng.uniform(100, 400))
            out[key], out[key + "_stderr"] = value, 0.05 * value
        else:
            value = float(rng.uniform(0.2, 0.6))
            out[key], out[key + "_stderr"] = value, math.sqrt(value * (1 - value) / 120)
    return out


# The compute ledger's one-off items (cocomix/flops.py) as a run of each method reports them.
ONE_OFF = {"teacher_training": 4.0e15, "sae_training": 1.0e14, "label_extraction": 3.0e14}


def _ledger(method: str) -> dict:
    tokens = TOKENS[-1]
    out = {"compute/student_flops": 6.0e6 * tokens, "compute/online_teacher_flops": (2.0e6 if method == "kd" else 0.0) * tokens}
    items = {"kd": ["teacher_training"], "cocomix": list(ONE_OFF)}.get(method, [])
    out.update({f"compute/{i}_flops": ONE_OFF[i] for i in items})
    return {**out, "compute_notes": {i: "counted" for i in items}}


def build_experiment(root: Path) -> Path:
    """An experiment config and every planned run's folder, written with the harness's own writers."""
    from cocomix.config import dump_config, load_config
    from cocomix.files import atomic_write_json, write_sealed_json
    from cocomix.plan import plan_runs
    from cocomix.records import MetricsLog

    config = root / "experiment.yaml"
    dump_config(load_config(ROOT / "config/tiny.yaml", [f"results_dir={root / 'results'}", "tracking.enabled=false",
                                                         "dag.seeds=[0,1]", "dag.method_seeds={}"]), config)
    for spec in plan_runs(config):
        cfg = spec.config(config)
        label = spec.ablation or spec.method
        cfg.run_dir.mkdir(parents=True)
        log = MetricsLog(cfg.run_dir / "metrics.jsonl")
        for t, loss in _curve(label, spec.seed):
            log.write({"step": t // 100, "tokens_seen": t, "train/loss": loss + 0.1})
            log.write({"step": t // 100, "tokens_seen": t, "val/loss": loss, "val/ppl": math.exp(loss),
                       **_diagnostics(label, spec.seed, t)})
        for t in CKPT_TOKENS:
            write_sealed_json(cfg.run_dir / "checkpoints" / f"step_{t // 100:07d}" / "eval.json",
                              {"checkpoint": "x", "step": t // 100, "tokens_seen": t, "method": spec.method,
                               "settings": {}, "metrics": _metrics(label, spec.seed, t)})
        atomic_write_json(cfg.run_dir / "final_metrics.json", {
            "step": 40, "tokens_seen": TOKENS[-1], "val/loss": FINAL_LOSS[(label, spec.seed)],
            "val/ppl": math.exp(FINAL_LOSS[(label, spec.seed)]), "mlflow_run_id": f"id-{spec.name}",
            "flops_per_token": 6.0e6, "teacher_flops_per_token": 2.0e6 if spec.method == "kd" else 0,
            **_ledger(spec.method), **_diagnostics(label, spec.seed, TOKENS[-1])})
    exp = load_config(config).experiment_dir
    atomic_write_json(exp / "runs" / "teacher" / "final_metrics.json", {
        "step": 80, "tokens_seen": 2 * TOKENS[-1], "val/loss": TEACHER_LOSS, "mlflow_run_id": "id-teacher"})
    atomic_write_json(exp / "sae" / "metrics.json", SAE_METRICS)
    return config


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    from evals.report import report

    config = build_experiment(tmp_path_factory.mktemp("report"))
    return config, report(config)


def _md_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def _se(values, stderrs):
    """The tables' +- by its stated definition, computed independently: sqrt(s^2/n + mean SE_i^2)."""
    values, stderrs = np.asarray(values, float), np.asarray(stderrs, float)
    seed = values.var(ddof=1) / len(values) if len(values) > 1 else 0.0
    return values.mean(), math.sqrt(seed + np.mean(stderrs**2))


# ---------------------------------------------------------------- tables

GOLDEN = ROOT / "tests" / "golden" / "report"  # the tables of build_experiment's experiment, recorded


def test_tables_are_byte_identical_to_the_recorded_ones(experiment):
    """Every table file (.md, .tex, .csv) the report writes for the fabricated experiment, byte for byte as
    recorded in tests/golden/report/ (written by evals/report.py before it became a package), and no
    other. A change meant to alter a table re-records them: run `report(build_experiment(dir))` and copy
    `<experiment_dir>/tables/*.{md,tex,csv}` there. Nothing in them depends on the temporary folder."""
    tables = experiment[1] / "tables"
    written = sorted(p.name for p in tables.iterdir() if p.suffix in (".md", ".tex", ".csv"))
    assert written == sorted(p.name for p in GOLDEN.iterdir())
    differ = [name for name in written if (tables / name).read_bytes() != (GOLDEN / name).read_bytes()]
    assert not differ, f"tables differ from tests/golden/report/: {differ}"


def test_main_table_has_a_pm_on_every_downstream_cell_equal_to_an_independent_computation(experiment):
    _, exp_dir = experiment
    header, rows = _md_rows(exp_dir / "tables" / "main.md")
    downstream = header[header.index("LAMBADA ppl"):header.index("mlflow runs")]
    assert downstream[-2:] == ["synth_recall/acc", "synth_topic/acc"] and len(downstream) == 11
    assert {r[1] for r in rows} == set(METHODS) and all(r[2] == "2" for r in rows)
    csv_rows = {r["method"]: r for r in _csv_rows(exp_dir / "tables" / "main.csv")}
    final = {(m, s): _metrics(m, s, CKPT_TOKENS[-1]) for m in METHODS for s in (0, 1)}
    columns = dict(zip(["LAMBADA ppl", "WikiText ppl", "HellaSwag acc_n", "PIQA acc", "SIQA acc", "ARC-E acc",
                        "WinoG acc"], PAPER_VALUES)) | {k: k for k in PAPER_VALUES[-2:]}
    for row in rows:
        method = row[1]
        cells = dict(zip(header, row))
        for col in downstream:
            assert re.fullmatch(r"[0-9.]+ ± [0-9.]+", cells[col]), (method, col, cells[col])
        runs = [final[(method, s)] for s in (0, 1)]
        for col, key in columns.items():
            scale = 1 if key.endswith("perplexity") else 100
            mean, se = _se([scale * r[key] for r in runs], [scale * r[key + "_stderr"] for r in runs])
            assert cells[col] == f"{mean:.2f} ± {se:.2f}", (method, col)
            assert float(csv_rows[method][col]) == pytest.approx(mean, rel=1e-9)
            assert float(csv_rows[method][f"{col}_se"]) == pytest.approx(se, rel=1e-9)
        # Averages: per run, the mean of the components and sqrt(sum SE_k^2)/K; then across seeds.
        acc_keys = PAPER_VALUES[2:7]
        accs = [100 * np.mean([r[k] for k in acc_keys]) for r in runs]
        acc_se = [100 * math.sqrt(sum(r[k + "_stderr"] ** 2 for k in acc_keys)) / 5 for r in runs]
        assert cells["avg acc"] == "{:.2f} ± {:.2f}".format(*_se(accs, acc_se))
        ppls = [(r["val_ppl"] + r[PAPER_VALUES[0]] + r[PAPER_VALUES[1]]) / 3 for r in runs]
        ppl_se = [math.hypot(r[PAPER_VALUES[0] + "_stderr"], r[PAPER_VALUES[1] + "_stderr"]) / 3 for r in runs]
        assert cells["avg ppl"] == "{:.2f} ± {:.2f}".format(*_se(ppls, ppl_se))
        held = [r["val_ppl"] for r in runs]
        assert cells["held-out ppl"] == f"{np.mean(held):.2f} ± {np.std(held, ddof=1):.2f}"  # std over seeds
        assert float(csv_rows[method]["held-out ppl_std"]) == pytest.approx(np.std(held, ddof=1))
        assert cells["mlflow runs"] == f"id-{method}-base-s0 id-{method}-base-s1"
    text = (exp_dir / "tables" / "main.md").read_text()
    assert "SE = sqrt(s²/n + mean_i SE_i²)" in text.split("|")[-1]  # the footnote under the table


def test_main_table_gives_each_methods_loss_difference_to_ntp_paired_by_seed(experiment):
    _, exp_dir = experiment
    header, rows = _md_rows(exp_dir / "tables" / "main.md")
    cells = {r[1]: dict(zip(header, r)) for r in rows}
    csv_rows = {r["method"]: r for r in _csv_rows(exp_dir / "tables" / "main.csv")}
    assert cells["ntp"]["Δ loss vs NTP"] == "–"
    for method in ("kd", "pause", "cocomix"):
        d = [FINAL_LOSS[(method, s)] - FINAL_LOSS[("ntp", s)] for s in (0, 1)]
        half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / math.sqrt(2)
        assert cells[method]["Δ loss vs NTP"] == f"{np.mean(d):+.4f} ± {half:.4f}", method
        assert float(csv_rows[method]["Δ loss vs NTP_ci95"]) == pytest.approx(half)


def test_teacher_and_sae_tables_show_the_gap_to_the_students_and_the_margin_over_an_untrained_sae(experiment):
    _, exp_dir = experiment
    header, rows = _md_rows(exp_dir / "tables" / "teacher.md")
    cells = {r[0]: dict(zip(header, r)) for r in rows}
    assert cells["teacher"]["held-out loss"] == f"{TEACHER_LOSS:.4f}" and cells["teacher"]["tokens"] == "8,000"
    for method in METHODS:
        gaps = [FINAL_LOSS[(method, s)] - TEACHER_LOSS for s in (0, 1)]
        row = cells[f"{method} (base)"]
        assert row["seeds"] == "2" and row["tokens"] == "4,000"
        assert row["gap to teacher (nats)"] == f"{np.mean(gaps):+.4f} ± {np.std(gaps, ddof=1):.4f}"
    assert set(cells) == {"teacher"} | {f"{m} (base)" for m in METHODS}  # students are the main runs, no ablation
    header, rows = _md_rows(exp_dir / "tables" / "sae.md")
    row = dict(zip(header, rows[0]))
    assert (row["layer"], row["latents"], row["k"]) == ("5", "512", "8")  # config/tiny.yaml
    assert row["concept AUROC (best latent)"] == "0.874" and row["untrained SAE"] == "0.709"
    assert row["margin over untrained"] == f"{0.8735 - 0.7088:+.3f}" and row["mlflow run"] == "id-sae"
    assert row["best 8 latents (held out)"] == "0.931" and row["margin (8 latents)"] == f"{0.9312 - 0.8102:+.3f}"


def test_one_seed_pm_is_lm_evals_stderr_and_missing_stderrs_are_marked(experiment):
    from evals.report import DAGGER, load_runs, main_table

    config, _ = experiment
    runs = [r for r in load_runs(config) if r.seed == 0 and r.ablation is None]
    table = main_table(runs)
    row = dict(zip(table.header, table.rows[0]))
    m = _metrics(row["method"], 0, CKPT_TOKENS[-1])
    assert row["PIQA acc"].mean == pytest.approx(100 * m["piqa/acc"])
    assert row["PIQA acc"].spread == pytest.approx(100 * m["piqa/acc_stderr"])
    assert row["held-out ppl"].spread is None  # no spread over one seed, no lm-eval SE for it
    # An eval.json from before stderrs were kept: one seed gives no +-, two give the seed term, marked.
    for r in runs:
        r.downstream = {k: v for k, v in r.downstream.items() if not k.endswith("_stderr")}
    assert main_table(runs).rows[0][table.header.index("PIQA acc")].md() == f"{100 * m['piqa/acc']:.2f}"
    both = [r for r in load_runs(config) if r.label == "ntp"]
    for r in both:
        r.downstream.pop("piqa/acc_stderr")
    cell = main_table(both).rows[0][table.header.index("PIQA acc")]
    vals = [100 * r.downstream["piqa/acc"] for r in both]
    assert cell.spread == pytest.approx(np.std(vals, ddof=1) / math.sqrt(2)) and cell.md().endswith(DAGGER)


def test_differences_to_ntp_and_cocomix_are_paired_by_seed(experiment):
    _, exp_dir = experiment
    header, rows = _md_rows(exp_dir / "tables" / "ablations.md")
    cells = {r[1]: dict(zip(header, r)) for r in rows}
    assert list(cells) == ["cocomix", "act_labels", "mix_only", "token_readout"]
    # cocomix - ntp per seed: 2.90 - 3.00 and 3.06 - 3.10; mean -0.07, t-interval with 1 dof.
    d = [2.90 - 3.00, 3.06 - 3.10]
    half = 12.706204736174698 * np.std(d, ddof=1) / math.sqrt(2)
    assert cells["cocomix"]["Δ vs NTP"] == f"{np.mean(d):+.4f} ± {half:.4f}" == "-0.0700 ± 0.3812"
    assert cells["cocomix"]["Δ vs CoCoMix"] == cells["cocomix"]["MDE vs CoCoMix"] == "–"  # not against itself
    # The ablation ran seed 0 only: paired with NTP's and CoCoMix's seed 0, not with their means.
    assert cells["act_labels"]["Δ vs NTP"] == "-0.0500"  # 2.95 - 3.00 (the unpaired 2.95 - 3.05 = -0.1000)
    assert cells["act_labels"]["Δ vs CoCoMix"] == "+0.0500"  # 2.95 - 2.90
    assert cells["mix_only"]["Δ vs NTP"] == "+0.0100" and cells["act_labels"]["seeds"] == "1"
    assert cells["cocomix"]["held-out loss"] == f"{np.mean([2.90, 3.06]):.4f} ± {np.std([2.90, 3.06], ddof=1):.4f}"
    by_variant = {r["variant"]: r for r in _csv_rows(exp_dir / "tables" / "ablations.csv")}
    assert float(by_variant["cocomix"]["Δ vs NTP"]) == pytest.approx(-0.07)
    assert float(by_variant["cocomix"]["Δ vs NTP_ci95"]) == pytest.approx(half)
    assert by_variant["act_labels"]["Δ vs NTP_ci95"] == ""


def _tex_tables(exp_dir: Path) -> dict[str, str]:
    paths = sorted((exp_dir / "tables").glob("*.tex"))
    assert [p.stem for p in paths] == ["ablations", "compute", "diagnostics", "main", "paired_downstream", "sae",
                                         "sample_efficiency", "seed_variance", "teacher", "tuning"]
    return {p.stem: p.read_text() for p in paths}


# Text width of LaTeX's article class at 10pt (345pt).
TEXT_WIDTH_PT = 345.0


def _estimated_widths_pt(tex: str) -> list[float]:
    r"""Natural width of each tabular in a table, estimated without LaTeX: per column its widest
    cell line (about 5pt a character of normal size, 3.5pt in \scriptsize, a math command one
    character), plus 8pt of column separation."""
    def chars(s: str) -> int:
        return len(re.sub(r"\\[A-Za-z]+|\\.", "x", re.sub(r"[${}]", "", s)))

    out = []
    for body in re.findall(r"\\toprule(.*?)\\bottomrule", tex, flags=re.S):
        widths: dict[int, float] = {}
        for line in body.strip().splitlines():
            if not line.endswith(r"\\"):
                continue
            for i, cell in enumerate(line[:-2].split(" & ")):
                cell = re.sub(r"\\begin\{tabular\}\[t\]\{@\{\}[lrc]@\{\}\}|\\end\{tabular\}", "", cell)
                parts = cell.split(r"\\[-1pt]")
                width = max(3.5 * chars(p.replace(r"\scriptsize", "")) if r"\scriptsize" in p else 5.0 * chars(p)
                            for p in parts)
                widths[i] = max(widths.get(i, 0.0), width)
        out.append(sum(widths.values()) + 8.0 * len(widths))
    return out


def test_tex_tables_are_ascii_escaped_without_run_ids_and_fit_the_page(experiment):
    _, exp_dir = experiment
    tables = _tex_tables(exp_dir)
    for name, tex in tables.items():
        assert tex.isascii(), name
        assert "id-ntp" not in tex and "untracked" not in tex and "mlflow" not in tex, name
        assert (r"$\pm$" in tex or name in ("sae", "compute", "tuning", "seed_variance")) and "±" not in tex, name  # counts: no spread
        body = tex.split("\n", 1)[1].replace(" & ", " ")  # after the comment line, without column separators
        body = re.sub(r"\\[_%&#$]|\$[^$]*\$|\}%$", "", body, flags=re.M)  # escapes, math, a line-end comment
        assert not re.search(r"[_%&#]", body), (name, re.findall(r".{20}[_%&#].{20}", body))  # none raw
        # Each tabular is set in a box, scaled to the line only when wider (no overfull box either way),
        # and designed to be about a line wide: scaling, if any, is slight.
        n_tabulars = tex.count(r"\sbox0{\begin{tabular}")
        assert tex.count(r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi") == n_tabulars
        widths = _estimated_widths_pt(tex)
        assert len(widths) == n_tabulars and all(w < 1.1 * TEXT_WIDTH_PT for w in widths), (name, widths)
    # main: perplexities, the paper's accuracies, the synthetic tasks' accuracies, one above the other
    assert tables["main"].count(r"\toprule") == 3 and r"synth\_topic" in tables["main"]
    assert r"$\Delta$ vs NTP" in tables["ablations"] and r"act\_labels" in tables["ablations"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (apt texlive-latex-base); "
                    "the LaTeX-free checks above still run")
def test_every_tex_table_compiles_with_pdflatex_on_a_page_without_overfull_boxes(experiment, tmp_path):
    _, exp_dir = experiment
    for name, tex in _tex_tables(exp_dir).items():
        (tmp_path / f"{name}.tex").write_text(tex)
        doc = tmp_path / f"doc_{name}.tex"
        doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                       f"\\input{{{name}.tex}}\n\\end{{document}}\n")
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        log = (tmp_path / f"doc_{name}.log").read_text(errors="replace")
        assert proc.returncode == 0, (name, proc.stdout[-2000:])
        assert "Overfull \\hbox" not in log, (name, log[-3000:])
        assert (tmp_path / f"doc_{name}.pdf").stat().st_size > 1000


def test_sample_efficiency_table_interpolates_and_reports_ci(experiment):
    from evals.report import tokens_to_reach

    _, exp_dir = experiment
    rows = {r["method"]: r for r in _csv_rows(exp_dir / "tables" / "sample_efficiency.csv")}
    reached = [tokens_to_reach(_curve("cocomix", s), FINAL_LOSS[("ntp", s)]) for s in (0, 1)]
    assert rows["cocomix"]["seeds reaching NTP"] == "2/2"
    assert float(rows["cocomix"]["tokens to NTP's final loss"]) == pytest.approx(np.mean(reached))
    half = stats.t.ppf(0.975, 1) * np.std(reached, ddof=1) / math.sqrt(2)
    assert float(rows["cocomix"]["tokens to NTP's final loss_ci95"]) == pytest.approx(half)
    # kd's seed 1 ends at 3.11 > NTP's 3.10: the mean is over seed 0 alone, with no interval.
    assert rows["kd"]["seeds reaching NTP"] == "1/2" and rows["kd"]["tokens to NTP's final loss_ci95"] == ""
    assert float(rows["kd"]["tokens to NTP's final loss"]) == pytest.approx(tokens_to_reach(_curve("kd", 0), 3.00))
    assert rows["mix_only"]["seeds reaching NTP"] == "0/1"  # 3.01 > 3.00
    assert rows["mix_only"]["tokens to NTP's final loss"] == "not reached" and rows["mix_only"]["tokens saved (%)"] == ""


# ---------------------------------------------------------------- plots


def test_plots_exist_and_their_bands_are_the_stated_statistics(experiment):
    from evals.report import (CHANCE, average_chance, delta_curves, downstream_curve, final_task_scores, group,
                              load_runs, seed_band, t95)

    config, exp_dir = experiment
    for kind in ("heldout_loss", "downstream"):
        png = exp_dir / "plots" / f"{kind}_base.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    groups = group(load_runs(config))
    # Held-out loss: mean over seeds, band +-1 std over seeds, at every eval point.
    band = seed_band([r.curve for r in groups[("base", "kd")]], "std")
    curves = np.array([[y for _, y in _curve("kd", s)] for s in (0, 1)])
    assert band.x == TOKENS and band.n == 2
    assert band.mean == pytest.approx(curves.mean(0)) and band.half == pytest.approx(curves.std(0, ddof=1))
    # Minus NTP, paired by seed: mean difference and its 95% t-interval.
    delta = seed_band(delta_curves(groups[("base", "cocomix")], groups[("base", "ntp")]), "t95")
    d = np.array([[a - b for (_, a), (_, b) in zip(_curve("cocomix", s), _curve("ntp", s))] for s in (0, 1)])
    assert delta.mean == pytest.approx(d.mean(0)) and delta.mean[-1] == pytest.approx(-0.07)
    assert delta.half == pytest.approx(t95(1) * d.std(0, ddof=1) / math.sqrt(2))
    one = seed_band(delta_curves(groups[("base", "act_labels")], groups[("base", "ntp")]), "t95")
    assert one.n == 1 and one.half == [0.0] * 4 and one.mean[-1] == pytest.approx(-0.05)
    # Downstream: the average accuracy's mean and combined SE at each checkpoint, chance lines.
    curve = downstream_curve(groups[("base", "pause")])
    keys = PAPER_VALUES[2:7]
    for i, t in enumerate(CKPT_TOKENS):
        ms = [_metrics("pause", s, t) for s in (0, 1)]
        mean, se = _se([np.mean([m[k] for k in keys]) for m in ms],
                       [math.sqrt(sum(m[k + "_stderr"] ** 2 for k in keys)) / 5 for m in ms])
        assert curve.x[i] == t and curve.mean[i] == pytest.approx(mean) and curve.se[i] == pytest.approx(se)
    assert average_chance(keys) == pytest.approx((1 / 4 + 1 / 2 + 1 / 3 + 0.2502 + 1 / 2) / 5)
    scores = final_task_scores(groups[("base", "ntp")], ["synth_topic/acc"])
    ms = [_metrics("ntp", s, CKPT_TOKENS[-1]) for s in (0, 1)]
    assert scores["synth_topic/acc"] == pytest.approx(_se([m["synth_topic/acc"] for m in ms],
                                                         [m["synth_topic/acc_stderr"] for m in ms]))
    assert CHANCE["synth_topic/acc"] == 0.25



def test_diagnostics_table_and_plot_show_what_the_readout_slot_does(experiment):
    from evals.report import diagnostic_curves, group, load_runs, seed_band

    config, exp_dir = experiment
    rows = {r["variant"]: r for r in _csv_rows(exp_dir / "tables" / "diagnostics.csv")}
    assert list(rows) == ["pause", "cocomix", "act_labels", "mix_only", "token_readout"]  # interleaving only
    for label, seeds in (("cocomix", (0, 1)), ("pause", (0, 1)), ("act_labels", (0,))):
        finals = [_diagnostics(label, s, TOKENS[-1]) for s in seeds]
        attn = [f["val/readout_self_attn"] for f in finals]
        assert float(rows[label]["read-out attention to own token"]) == pytest.approx(np.mean(attn))
        std = rows[label]["read-out attention to own token_std"]
        assert (float(std) == pytest.approx(np.std(attn, ddof=1))) if len(seeds) > 1 else std == ""
        assert float(rows[label]["uniform"]) == pytest.approx(0.021)
    no_code = [_diagnostics("cocomix", s, TOKENS[-1])["val/loss_no_concept"] for s in (0, 1)]
    assert float(rows["cocomix"]["loss without concept code"]) == pytest.approx(np.mean(no_code))
    assert float(rows["cocomix"]["loss without concept code_std"]) == pytest.approx(np.std(no_code, ddof=1))
    assert rows["pause"]["loss without concept code"] == "" and rows["mix_only"]["concept acc (top-1)"] == ""
    md = (exp_dir / "tables" / "diagnostics.md").read_text()
    assert "| base | pause | 2 |" in md and "–" in md and "id-pause-base-s0 id-pause-base-s1" in md
    png = exp_dir / "plots" / "diagnostics_base.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    # The plotted curve of the loss increase: mean over seeds of (loss without code - loss) per eval point.
    band = seed_band(diagnostic_curves(group(load_runs(config))[("base", "cocomix")], "val/loss_no_concept", "val/loss"))
    want = [np.mean([_diagnostics("cocomix", s, t)["val/loss_no_concept"] - _curve("cocomix", s)[i][1] for s in (0, 1)])
            for i, t in enumerate(TOKENS)]
    assert band.x == TOKENS and band.mean == pytest.approx(want)


def test_every_number_column_of_every_table_reaches_its_tex(experiment):
    """sae.tex dropped its concept-recovery (AUROC) panel, which its caption describes: the LaTeX writer kept
    only panels with a +- column. Every column with a number in a table's .md must be in its .tex."""
    _, exp_dir = experiment
    tables = exp_dir / "tables"
    checked = 0
    for md in sorted(tables.glob("*.md")):
        lines = [x for x in md.read_text().splitlines() if x.startswith("| ")]
        header = [h.strip() for h in lines[0].strip("|").split(" | ")]
        rows = [[c.strip() for c in x.strip("|").split(" | ")] for x in lines[1:]]
        tex = (tables / f"{md.stem}.tex").read_text()
        for i, h in enumerate(header):
            if not any(re.match(r"^[+\-−]?\d", r[i]) for r in rows if i < len(r)):
                continue
            cut = max(h.rfind(" "), h.rfind("/"))  # a long header is set on two lines
            pieces = [h] if cut <= 0 or len(h) <= 8 else [h[:cut], h[cut + 1:]]
            for piece in pieces:
                escaped = piece.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
                assert escaped in tex, (md.stem, h)
            checked += 1
    assert checked > 30
    assert "AUROC" in (tables / "sae.tex").read_text()


# ---------------------------------------------------------------- power

def test_the_minimum_detectable_effect_has_80_percent_power_by_simulation():
    # The paired t-test's power at the MDE, by 40,000 simulated experiments of n normal differences
    # (an independent check of the noncentral-t integral), and the same power from scipy's nct where
    # its tails are finite.
    from scipy.stats import nct, t, ttest_1samp

    from evals.report.stats import mde80, paired_power, pairs_needed

    rng = np.random.default_rng(0)
    for sd, n in ((0.07, 3), (0.18, 5), (1.0, 12)):
        mde = mde80(sd, n)
        diffs = rng.normal(mde, sd, size=(40_000, n))
        rejected = ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05
        assert rejected.mean() == pytest.approx(0.80, abs=0.01), (sd, n)
        c = t.ppf(0.975, n - 1)
        nc = mde * math.sqrt(n) / sd
        assert paired_power(mde, sd, n) == pytest.approx(nct.sf(c, n - 1, nc) + nct.cdf(-c, n - 1, nc), abs=1e-9)
    assert mde80(0.07, 3) == pytest.approx(0.2285, abs=1e-4)  # 3 seeds at the tiny default's spread: ~0.2 nats
    need = pairs_needed(0.07, 0.024)
    assert paired_power(0.024, 0.07, need) >= 0.8 > paired_power(0.024, 0.07, need - 1) and need == 69
    assert mde80(0.07, 1) is None and mde80(0.0, 3) is None


# ---------------------------------------------------------------- paired downstream

def test_paired_downstream_differences_match_scipys_binomial_test_and_bootstrap(tmp_path):
    # Two seeds of NTP and of a method scored on the same 200 documents of one task: the table's
    # McNemar p is scipy's exact binomial test of the discordant counts, its mean the plain mean of
    # the paired differences, its interval scipy.stats.bootstrap's percentile interval (same
    # resampling of documents: both draw document indices from one generator).
    from scipy.stats import binomtest

    from evals.report.paired import BOOTSTRAP_RESAMPLES, bootstrap_ci, paired_downstream_table, paired_scores
    from evals.report.runs import Run
    from evals.run import write_samples

    rng = np.random.default_rng(7)
    docs = list(range(200))
    runs = []
    truth = {}
    for method, p in (("ntp", 0.55), ("cocomix", 0.62)):
        for seed in (0, 1):
            acc = (rng.random(200) < p).astype(float)
            truth[(method, seed)] = acc
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            sha = write_samples(folder / "lm_eval_samples.json.gz",
                                {"synth_topic": {"doc_id": docs[::-1], "acc": acc[::-1].tolist()}})  # any order
            record = {"lm_eval_samples": {"file": "lm_eval_samples.json.gz", "sha256": sha}}
            runs.append(Run(f"{method}-base-s{seed}", method, "base", seed, None, folder, None, {}, [],
                            final_eval=(folder, record)))
    x = paired_scores([r for r in runs if r.method == "cocomix"], [r for r in runs if r.method == "ntp"],
                      "synth_topic", "acc")
    want = np.stack([truth[("cocomix", s)] - truth[("ntp", s)] for s in (0, 1)], axis=1)
    assert np.array_equal(x, want)
    table = paired_downstream_table(runs)
    (row,) = table.rows
    b, c = int((want > 0).sum()), int((want < 0).sum())
    assert row[:5] == ["base", "cocomix", "synth_topic/acc", "200", "2"] and row[6:8] == [str(b), str(c)]
    assert row[8].mean == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert row[5].mean == pytest.approx(100 * want.mean())
    lo, hi = bootstrap_ci(want)
    per_doc = want.mean(axis=1)
    idx = np.random.default_rng(0).integers(0, 200, size=(BOOTSTRAP_RESAMPLES, 200))
    ref = np.percentile(per_doc[idx].mean(axis=1), [2.5, 97.5])
    assert (lo, hi) == pytest.approx(tuple(ref))
    from scipy.stats import bootstrap
    sp = bootstrap((per_doc,), np.mean, n_resamples=20_000, method="percentile", random_state=1).confidence_interval
    assert lo == pytest.approx(sp.low, abs=0.01) and hi == pytest.approx(sp.high, abs=0.01)
    assert row[5].spread == pytest.approx(100 * max(want.mean() - lo, hi - want.mean()))
    # A damaged samples file is one line naming it.
    (tmp_path / "cocomix-0" / "lm_eval_samples.json.gz").write_bytes(b"x")
    from cocomix.data import DataError
    with pytest.raises(DataError, match=r"lm_eval_samples.json.gz: does not match the sha256 its eval.json recorded"):
        paired_downstream_table(runs)


def test_compute_table_amortises_each_one_off_item_over_the_runs_that_read_it(experiment):
    from evals.report.runs import load_runs
    from cocomix.plan import plan_runs

    config, exp_dir = experiment
    header, rows = _md_rows(exp_dir / "tables" / "compute.md")
    cells = {r[0]: dict(zip(header, r)) for r in rows}
    specs = plan_runs(config)
    readers = {"teacher_training": sum(s.method in ("kd", "cocomix") for s in specs),  # ablations are CoCoMix runs
               "sae_training": sum(s.method == "cocomix" for s in specs)}
    readers["label_extraction"] = readers["sae_training"]
    tokens = TOKENS[-1]
    ntp = 6.0e6 * tokens
    kd = 8.0e6 * tokens + ONE_OFF["teacher_training"] / readers["teacher_training"]
    cocomix = ntp + sum(ONE_OFF[i] / readers[i] for i in ONE_OFF)
    for label, total, online in (("ntp", ntp, 0.0), ("kd", kd, 2.0e6 * tokens), ("cocomix", cocomix, 0.0)):
        row = cells[f"{label} (base)"]
        assert float(row["amortised"]) == pytest.approx(total, rel=1e-3), label
        assert float(row["online teacher"]) == pytest.approx(online) if online else row["online teacher"] == "0"
        assert row["vs NTP"] == f"{total / ntp:.2f}x"
    assert cells["ntp (base)"]["teacher training"] == "" and cells["kd (base)"]["label extraction"] == ""
    assert float(cells["cocomix (base)"]["label extraction"]) == ONE_OFF["label_extraction"]
    assert len(load_runs(config)) == len(specs)
