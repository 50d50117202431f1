"""The compute table: what every method's runs cost, student and teacher side apart (the ledger each
run's final_metrics.json carries, `Trainer.compute_ledger`; conventions in cocomix/flops.py)."""

from __future__ import annotations

from cocomix.compute import ONE_OFF, amortised_total, shares as run_shares

from .runs import Run, group, label_order
from .writers import MISSING, Table, tex_escape


def flops(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3g}"


def shares(runs: list[Run]) -> dict[tuple[str, float], int]:
    """How many of the experiment's runs read each one-off item, told apart by its FLOPs (cocomix/compute.py)."""
    return run_shares([r.final for r in runs])


def amortised(run: Run, share: dict[tuple[str, float], int]) -> float | None:
    """Student + online teacher + this run's equal share of every counted one-off item."""
    return amortised_total(run.final, share)


def compute_table(runs: list[Run]) -> Table:
    """Per method and scale (mean over seeds): tokens, the student's training FLOPs, the online teacher's
    (KD, online labels), the one-off items the run reads (the teacher's training, the SAE's, label
    extraction; "not counted" when the run's config cannot say), the per-run total and the total with
    the one-off items amortised over the runs of the experiment that read them."""
    header = ["method", "seeds", "tokens", "student", "online teacher", "teacher training",
              "SAE training", "label extraction", "per run", "amortised", "vs NTP"]
    share = shares(runs)
    groups = group(runs)
    order = label_order({label for _, label in groups})
    totals = {key: sum(amortised(r, share) for r in rs) / len(rs) for key, rs in groups.items()
              if all("compute/student_flops" in r.final for r in rs)}
    rows: list[list] = []
    for (scale, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        if (scale, label) not in totals:
            rows.append([f"{label} ({scale})", str(len(rs))] + [MISSING] * (len(header) - 2))
            continue
        mean = lambda key: sum(r.final[key] for r in rs) / len(rs)  # noqa: E731
        one_off = []
        for item in ONE_OFF:
            value = rs[0].final.get(f"compute/{item}_flops")  # one amount for every seed
            noted = any(item in (r.final.get("compute_notes") or {}) for r in rs)
            one_off.append("" if not noted else ("not counted" if value is None else flops(value)))
        ntp = totals.get((scale, "ntp"))
        rows.append([f"{label} ({scale})", str(len(rs)), f"{int(mean('tokens_seen')):,}", flops(mean("compute/student_flops")),
                     flops(mean("compute/online_teacher_flops")), *one_off,
                     flops(mean("compute/student_flops") + mean("compute/online_teacher_flops")),
                     flops(totals[(scale, label)]), f"{totals[(scale, label)] / ntp:.2f}x" if ntp else MISSING])
    counts = ", ".join(f"{item.replace('_', ' ')} ({value:.3g}) over {n} run(s)" for (item, value), n in share.items())
    note = ("Training FLOPs: the student's, the online teacher's (KD, online labels), the one-off items; per run: "
            "student + online teacher; amortised: per run plus the run's share of the one-off items. FLOPs by cocomix/flops.py's convention (6 per parameter a token for training, attention over the full "
            "T x T square); the paper's FLOPs count the student only (spec 4.5). One-off items are shared: the "
            "amortised total adds each run's equal share of every counted item, an item being one amount read by several runs" + (f" ({counts})" if counts else "")
            + "; \"not counted\" marks a given teacher without teacher.training_flops or a given SAE (sae.path), "
            "which the amortised total then leaves out; an empty cell: the method reads no such item.")
    panels = [header[:5] + ["per run"],
              [header[0], "teacher training", "SAE training", "label extraction", "amortised", "vs NTP"]]
    return Table(header, rows, {}, [note], [tex_escape(note)], tex_panels=panels)
