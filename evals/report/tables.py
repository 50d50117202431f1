"""The report's tables, one builder each: main (perplexity and downstream scores), sample efficiency,
ablations, read-out diagnostics, teacher against students and the SAE, with their notes."""

from __future__ import annotations

from cocomix.tracking import run_id_of

from .runs import (DOWNSTREAM, Run, extra_accuracy_keys, group, heldout_ppl, ids, label_order, paired, run_avg_acc,
                   run_avg_ppl, run_downstream)
from .stats import PAPER_EFFECT_69M, combined_se, mde80, mean_ci95, mean_std, pairs_needed, tokens_to_reach
from .writers import MISSING, Cell, Table, tex_escape


DAGGER = "†"  # a +- with the seed term only (no per-run standard error recorded)


def downstream_cell(per_run: list[tuple[float, float | None] | None], scale_by: float = 1.0) -> Cell:
    """Mean over seeds +- combined SE of per-run (value, lm-eval SE) pairs; "–" when a seed lacks it."""
    if not per_run or any(p is None for p in per_run):
        return MISSING
    mean, se, complete = combined_se([scale_by * v for v, _ in per_run],
                                     [None if s is None else scale_by * s for _, s in per_run])
    return Cell(mean, se, mark="" if complete or se is None else DAGGER)


MAIN_NOTES_MD = [
    f"Downstream ± (accuracies in %): standard error of the mean over the n seeds, SE = sqrt(s²/n + mean_i SE_i²), "
    "s² the variance over seeds (0 for one seed) and SE_i lm-eval's standard error of run i (binomial for "
    "accuracies, bootstrap over documents for perplexities); the seeds share the documents, so that part is "
    "not divided by n. avg acc and avg ppl: SE_i = sqrt(Σ_k SE_ik²)/K over their K components (held-out ppl "
    f"adds none). {DAGGER}: no per-run SE recorded, seed term only.",
    "held-out ppl: mean ± one standard deviation over seeds (none with one seed).",
    "Δ loss vs NTP: final held-out loss (nats) minus the NTP run's of the same seed and scale, mean over seeds ± "
    "half-width of the 95% t-interval (none with one pair).",
]
MAIN_NOTES_TEX = [
    r"Downstream $\pm$ (accuracies in \%): standard error of the mean over the $n$ seeds,"
    r" $\mathrm{SE}=\sqrt{s^2/n+\frac{1}{n}\sum_i \mathrm{SE}_i^2}$, $s^2$ the variance over seeds"
    r" (0 for one seed), $\mathrm{SE}_i$ lm-eval's standard error of run $i$ (binomial for accuracies, bootstrap"
    r" over documents for perplexities); the seeds share the documents, so that part is not divided by $n$."
    r" Avg acc, avg ppl: $\mathrm{SE}_i=\sqrt{\sum_k \mathrm{SE}_{ik}^2}/K$ over their $K$ components (held-out"
    r" ppl adds none). $^\dagger$: no per-run SE recorded, seed term only."
    r" Held-out ppl: mean $\pm$ one standard deviation over seeds. $\Delta$ loss vs NTP: final held-out loss"
    r" (nats) minus the NTP run's of the same seed, mean $\pm$ half-width of the 95\% $t$-interval.",
]
DELTA_NTP = "Δ loss vs NTP"
MDE_NTP = "MDE vs NTP"  # the smallest true Δ the seeds' paired t-test finds at 80% power (stats.mde80)


DELTA_FLOPS, DELTA_FLOPS_ALL = "Δ at equal FLOPs", "Δ at equal FLOPs, amortised"
FLOPS_NOTE = ("Δ at equal FLOPs: final held-out loss minus that of the NTP arm of the same seed whose token budget "
              "spends the method's per-step FLOPs (student + online teacher; run ntp@<method>); amortised: the arm "
              "ntp@<method>+ spends those plus the method's share of the teacher's training, the SAE's and label "
              "extraction, each divided over the runs that read it (the compute table); mean ± 95% t-interval. "
              "Rows ntp@...: those NTP arms (no Δ of their own).")


def main_table(runs: list[Run], tuning: str | None = None) -> Table:
    """`tuning`: the line saying how the methods were tuned (cocomix/tune.py), added to the notes."""
    extra = extra_accuracy_keys(runs)
    main = [r for r in runs if r.ablation is None]
    arms = group([r for r in main if r.arm is not None])
    deltas = [DELTA_FLOPS] + ([DELTA_FLOPS_ALL] if any(k[1].endswith("+") for k in arms) else []) if arms else []
    flops_cols = [c for d in deltas for c in (d, f"MDE {d[2:]}")]  # each Δ with its minimum detectable effect
    header = (["scale", "method", "seeds", "held-out ppl", DELTA_NTP, MDE_NTP] + flops_cols + [c for c, _, _ in DOWNSTREAM]
              + ["avg ppl", "avg acc"] + extra + ["mlflow runs"])
    rows, power = [], []
    groups = group(main)
    for (scale, label), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        ntp = groups.get((scale, "ntp"))
        method_row = label != "ntp" and rs[0].arm is None
        delta = paired_delta(rs, ntp) if method_row else MISSING
        mde = paired_mde(rs, ntp) if method_row else MISSING
        if method_row:
            power.append((scale, label, paired_diffs(rs, ntp)))
        cells: list[Cell | str] = [scale, label, str(len(rs)), Cell(*mean_std([heldout_ppl(r) for r in rs])), delta, mde]
        for suffix in ("", "+")[:len(deltas)]:
            arm = groups.get((scale, f"ntp@{label}{suffix}"))
            cells += [paired_delta(rs, arm), paired_mde(rs, arm)] if method_row and arm else [MISSING, MISSING]
        for _, key, lower in DOWNSTREAM:
            cells.append(downstream_cell([run_downstream(r, key) for r in rs], 1 if lower else 100))
        cells.append(downstream_cell([run_avg_ppl(r) for r in rs]))
        cells.append(downstream_cell([run_avg_acc(r) for r in rs], 100))
        for key in extra:
            cells.append(downstream_cell([run_downstream(r, key) for r in rs], 100))
        cells.append(ids(rs))
        rows.append(cells)
    spread = {"held-out ppl": "std", DELTA_NTP: "ci95", **{h: "se" for h in header[6 + len(flops_cols):-1]},
              **{h: "ci95" for h in deltas}}
    # LaTeX: perplexities, the paper's accuracies, and Δ with its MDE beside other tasks' accuracies, each
    # panel about a line wide (all 15 columns in one row are twice that)
    keys = header[:3]
    ppl = ["held-out ppl"] + [c for c, _, lower in DOWNSTREAM if lower] + ["avg ppl"]
    acc = [c for c, _, lower in DOWNSTREAM if not lower] + ["avg acc"]
    notes = [n for n in (power_note(power), FLOPS_NOTE if flops_cols else None, tuning) if n]
    return Table(header, rows, spread, MAIN_NOTES_MD + notes, MAIN_NOTES_TEX + [tex_escape(n) for n in notes],
                 tex_panels=[keys + ppl, keys[:2] + acc, keys[:2] + [DELTA_NTP, MDE_NTP] + flops_cols + extra])  # seeds: once


def sample_efficiency_table(runs: list[Run]) -> Table:
    header = ["scale", "method", "seeds reaching NTP", "tokens to NTP's final loss", "tokens saved (%)", "mlflow runs"]
    rows = []
    ntp = {(r.scale, r.pair_key): r for r in runs if r.label == "ntp"}
    for (scale, label), rs in group(runs).items():
        if label == "ntp":
            continue
        reached, saved, used = [], [], []
        for r in sorted(rs, key=lambda r: r.seed):
            ref = ntp.get((r.scale, r.pair_key))
            if ref is None or not ref.curve:
                continue
            used.append(r)
            target_tokens, target_loss = ref.curve[-1]
            t = tokens_to_reach(r.curve, target_loss)
            if t is not None:
                reached.append(t)
                saved.append(100.0 * (1.0 - t / target_tokens))
        if not used:
            continue
        tok = Cell(*mean_ci95(reached), digits=0) if reached else Cell(None, text="not reached")
        sav = Cell(*mean_ci95(saved), digits=1) if reached else MISSING
        rows.append([scale, label, f"{len(reached)}/{len(used)}", tok, sav, ids(used)])
    notes_md = ["± : half-width of the 95% t-interval over the seeds that reached NTP's final loss (none with one seed)."]
    notes_tex = [r"$\pm$: half-width of the 95\% $t$-interval over the seeds that reached NTP's final loss."]
    return Table(header, rows, {"tokens to NTP's final loss": "ci95", "tokens saved (%)": "ci95"}, notes_md, notes_tex)


def paired_diffs(runs: list[Run], refs: list[Run] | None) -> list[float]:
    return [r.final["val/loss"] - ref.final["val/loss"] for r, ref in paired(runs, refs or [])]


def paired_mde(runs: list[Run], refs: list[Run] | None) -> Cell:
    """The minimum detectable effect (nats) at 80% power of the paired Δ, from its measured spread and
    number of pairs; "–" with fewer than two pairs."""
    diffs = paired_diffs(runs, refs)
    sd = mean_std(diffs)[1] if len(diffs) >= 2 else None
    return Cell(mde80(sd, len(diffs)) if sd else None, digits=4)


def power_note(rows: list[tuple[str, str, list[float]]]) -> str | None:
    """One line: for each comparison with a measured spread, the seeds the paired t-test would need to
    find the paper's 0.024-nat 69M effect at 80% power."""
    parts = []
    for scale, label, diffs in rows:
        sd = mean_std(diffs)[1] if len(diffs) >= 2 else None
        if sd:
            need = pairs_needed(sd)
            parts.append(f"{label} ({scale}): sd of Δ {sd:.3f} over {len(diffs)} pairs, "
                         f"{need if need is not None else 'more than 100,000'} seeds")
    if not parts:
        return None
    return (f"MDE vs NTP: the smallest true Δ the paired t-test over these seeds finds with 80% power at level 0.05, "
            f"from the measured spread; a Δ smaller than it is not evidence of no effect. Seeds needed to "
            f"resolve the paper's {PAPER_EFFECT_69M} nats (69M) at that spread: " + "; ".join(parts) + ".")


def paired_delta(runs: list[Run], refs: list[Run] | None) -> Cell:
    """Mean over seeds of (run's final held-out loss - the reference run's of the same seed) +- the
    95% t-interval half-width (two or more pairs); "–" without a common seed."""
    pairs = paired(runs, refs or [])
    if not pairs:
        return MISSING
    return Cell(*mean_ci95([r.final["val/loss"] - ref.final["val/loss"] for r, ref in pairs]), digits=4, signed=True)


def ablation_table(runs: list[Run]) -> Table:
    header = ["scale", "variant", "seeds", "held-out loss", "Δ vs CoCoMix", "MDE vs CoCoMix", "Δ vs NTP", MDE_NTP,
              "mlflow runs"]
    rows, power = [], []
    groups = group(runs)
    for scale in sorted({r.scale for r in runs}):
        ref_c = groups.get((scale, "cocomix"))
        ref_n = groups.get((scale, "ntp"))
        variants = ["cocomix"] + sorted({r.ablation for r in runs if r.ablation and r.scale == scale})
        for v in variants:
            rs = groups.get((scale, v))
            if not rs:
                continue
            loss = Cell(*mean_std([r.final["val/loss"] for r in rs]), digits=4)
            vs_c = (paired_delta(rs, ref_c), paired_mde(rs, ref_c)) if v != "cocomix" else (MISSING, MISSING)
            rows.append([scale, v, str(len(rs)), loss, *vs_c, paired_delta(rs, ref_n), paired_mde(rs, ref_n), ids(rs)])
            power.append((scale, v, paired_diffs(rs, ref_n)))
    notes_md = ["held-out loss: final in-training estimate, mean ± one standard deviation over seeds. "
                "Δ: mean over the seeds both have of (variant − reference), paired by seed, ± half-width of "
                "the 95% t-interval (none with one pair)."]
    notes_tex = [r"Held-out loss: final in-training estimate, mean $\pm$ one standard deviation over seeds."
                 r" $\Delta$: mean over the seeds both have of (variant $-$ reference), paired by seed,"
                 r" $\pm$ half-width of the 95\% $t$-interval."]
    note = power_note(power)
    return Table(header, rows, {"held-out loss": "std", "Δ vs CoCoMix": "ci95", "Δ vs NTP": "ci95"},
                 notes_md + ([note] if note else []), notes_tex + ([tex_escape(note)] if note else []))


# What the read-out slot does (cocomix/diagnostics.py): column -> (final metrics key, digits)
DIAGNOSTICS = {
    "held-out loss": ("val/loss", 4),
    "loss without concept code": ("val/loss_no_concept", 4),
    "read-out attention to own token": ("val/readout_self_attn", 3),
    "uniform": ("val/readout_self_attn_uniform", 3),
    "concept acc (top-1)": ("val/concept_acc", 3),
}


def diagnostics_table(runs: list[Run]) -> Table:
    """Every interleaving variant (pause, CoCoMix, its ablations) with its final read-out diagnostics,
    mean ± std over seeds; '–' where a variant has no such quantity (pause has no concept code)."""
    header = ["scale", "variant", "seeds", *DIAGNOSTICS, "mlflow runs"]
    rows = []
    groups = group(runs)
    for scale in sorted({r.scale for r in runs}):
        labels = [lab for (sc, lab), rs in groups.items()
                  if sc == scale and any("val/readout_self_attn" in r.final for r in rs)]
        for label in label_order(labels):
            rs = groups[(scale, label)]
            cells: list[Cell | str] = [scale, label, str(len(rs))]
            for key, digits in DIAGNOSTICS.values():
                values = [r.final[key] for r in rs if key in r.final]
                cells.append(Cell(*mean_std(values), digits=digits) if len(values) == len(rs) else MISSING)
            rows.append(cells + [ids(rs)])
    notes_md = ["Final in-training evaluation, mean ± one standard deviation over seeds. Read-out attention: the "
                "attention mass the slot the LM head reads gives its own token, mean over the blocks above the "
                "insertion point, their heads and the positions; uniform: the same for attention spread evenly "
                "over the prefix. Loss without concept code: the held-out loss with every concept logit scaled "
                "to 0 before TopK. Concept acc: top-1 predicted concept = the first label."]
    notes_tex = [r"Final in-training evaluation, mean $\pm$ one standard deviation over seeds. Read-out attention:"
                 r" attention mass the slot the LM head reads gives its own token (blocks above the insertion"
                 r" point, heads and positions averaged); uniform: the same for attention spread evenly over the"
                 r" prefix. Loss without concept code: every concept logit scaled to 0 before TopK."]
    return Table(header, rows, {k: "std" for k in DIAGNOSTICS}, notes_md, notes_tex,
                 tex_panels=[["scale", "variant", "seeds", "held-out loss", "loss without concept code"],
                             ["scale", "variant", "read-out attention to own token", "uniform", "concept acc (top-1)"]])


def teacher_table(runs: list[Run], teacher: dict | None) -> Table:
    """The teacher (the experiment's own NTP run, when the DAG trains it) against every method's
    students: tokens trained and final held-out loss (the same validation blocks), and the gap."""
    header = ["model", "seeds", "tokens", "held-out loss", "gap to teacher (nats)", "mlflow runs"]
    rows: list[list[Cell | str]] = []
    t_loss = teacher["val/loss"] if teacher else None
    if teacher:
        rows.append(["teacher", "1", f"{teacher['tokens_seen']:,}", Cell(t_loss, digits=4), MISSING,
                     run_id_of(teacher) or "(untracked:teacher)"])
    for (scale, label), rs in group([r for r in runs if r.ablation is None]).items():
        losses = [r.final["val/loss"] for r in rs]
        gap = Cell(*mean_std([v - t_loss for v in losses]), digits=4, signed=True) if teacher else MISSING
        tokens = sorted({r.final["tokens_seen"] for r in rs})
        rows.append([f"{label} ({scale})", str(len(rs)), " / ".join(f"{t:,}" for t in tokens),
                     Cell(*mean_std(losses), digits=4), gap, ids(rs)])
    notes_md = ["Final in-training held-out loss on the same validation blocks, students: mean ± one standard "
                "deviation over seeds. Gap: student minus teacher (positive: the teacher is better)."]
    notes_tex = [r"Final in-training held-out loss on the same validation blocks; students: mean $\pm$ one"
                 r" standard deviation over seeds. Gap: student minus teacher (positive: the teacher is better)."]
    return Table(header, rows, {"held-out loss": "std", "gap to teacher (nats)": "std"}, notes_md, notes_tex)


# The SAE's metrics.json (cocomix/sae.py): column -> (key, digits)
SAE_COLUMNS = {
    "FVU": ("fvu", 4),
    "L0": ("l0", 1),
    "dead latents": ("dead_fraction", 3),
    "loss increase (nats)": ("loss_increase", 4),
    "concept AUROC (best latent)": ("recovery/best_auroc", 3),
    "untrained SAE": ("recovery/untrained_best_auroc", 3),
    "random latent": ("recovery/random_auroc", 3),
    "best 8 latents (held out)": ("recovery/top8_auroc", 3),
    "untrained SAE (8 latents)": ("recovery/untrained_top8_auroc", 3),
}


def sae_table(sae: dict | None, cfg) -> Table:
    """The TopK SAE on the teacher's residual stream: reconstruction, and on the synthetic corpus how well
    its best latent per ground-truth concept detects that concept, against an untrained SAE of the
    same size (what picking the best of many random directions gives) and a blindly picked latent."""
    header = ["layer", "latents", "k", *SAE_COLUMNS, "margin over untrained", "margin (8 latents)", "mlflow run"]
    rows: list[list[Cell | str]] = []
    if sae:
        cells: list[Cell | str] = [str(cfg.sae.layer), str(cfg.sae.n_latents), str(cfg.sae.k)]
        cells += [Cell(sae[key], digits=d) if key in sae else MISSING for key, d in SAE_COLUMNS.values()]

        def margin(key: str) -> Cell:
            trained, untrained = sae.get(f"recovery/{key}"), sae.get(f"recovery/untrained_{key}")
            return MISSING if trained is None or untrained is None else Cell(trained - untrained, digits=3, signed=True)

        cells += [margin("best_auroc"), margin("top8_auroc"), run_id_of(sae) or "(untracked:sae)"]
        rows.append(cells)
    notes_md = ["FVU: fraction of the activations' variance the reconstruction leaves unexplained; loss increase: "
                "the teacher's held-out loss with its activation replaced by the reconstruction minus without. "
                "Concept AUROC (synthetic corpus only): per ground-truth concept the best latent's AUROC as a "
                "detector of the tokens carrying it, mean over concepts; untrained SAE: the same for an SAE of the "
                "same size at initialisation; random latent: a latent picked blindly. Best 8 latents: a concept "
                "spread over a few latents (one per cluster of its words, say): per concept the 8 latents with the "
                "best AUROC on the first half of the tokens, standardised and summed, scored on the second half."]
    notes_tex = [r"FVU: fraction of variance unexplained; loss increase: teacher's held-out loss with the"
                 r" reconstruction minus without. Concept AUROC (synthetic corpus): per ground-truth concept the"
                 r" best latent's AUROC, mean over concepts; untrained SAE: the same at initialisation. Best 8"
                 r" latents: the 8 best on half the tokens, summed, scored on the other half."]
    return Table(header, rows, {}, notes_md, notes_tex,
                 tex_panels=[["layer", "latents", "k", "FVU", "L0", "dead latents", "loss increase (nats)"],
                             ["concept AUROC (best latent)", "untrained SAE", "random latent", "margin over untrained"],
                             ["best 8 latents (held out)", "untrained SAE (8 latents)", "margin (8 latents)"]])
