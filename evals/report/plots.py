"""The report's plots (matplotlib, imported when a plot is drawn): held-out loss, downstream accuracy and
read-out diagnostics against tokens, per scale, in fixed colours per method."""

from __future__ import annotations

import io
from pathlib import Path

from cocomix.files import atomic_write_bytes

from .curves import Band, average_chance, delta_curves, downstream_curve, final_task_scores, seed_band
from .runs import ACCURACY_KEYS, CHANCE, Run, accuracy_keys, diagnostic_curves, extra_accuracy_keys, group, label_order


def _colors(labels: list[str]) -> dict[str, str]:
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    return {lab: cycle[i % len(cycle)] for i, lab in enumerate(label_order(labels))}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from matplotlib.ticker import EngFormatter

    for ax in fig.axes:  # 250k, not 250000 (long tick labels run into each other)
        if ax.get_xlabel().startswith("tokens seen"):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")  # tight: nothing clipped
    fig.savefig(pdf, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})  # vector, for papers
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    atomic_write_bytes(path.with_suffix(".pdf"), pdf.getvalue())
    return path


def _no_data(ax, text: str = "no evaluations yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _band(ax, x, band: Band, color) -> None:
    """The mean as a line, the band as a light fill with thin edges (several bands stay readable)."""
    ax.plot(x, band.mean, color=color)
    if band.n > 1:
        ax.fill_between(x, band.lo, band.hi, color=color, alpha=0.12, linewidth=0)
        for edge in (band.lo, band.hi):
            ax.plot(x, edge, color=color, linewidth=0.6, alpha=0.6)


def _legend(fig, labels: list[str], colors: dict[str, str], n: dict[str, int], extra=()) -> None:
    """One legend for the figure, right of the panels (it covers no data)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[lab], label=f"{lab} ({n[lab]} seed{'s' if n[lab] > 1 else ''})")
               for lab in labels if lab in n]
    handles += list(extra)
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def plot_heldout(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    with_flops = bool(groups) and all(r.training_flops_per_token for rs in groups.values() for r in rs)
    fig, axes = plt.subplots(1, 3 if with_flops else 2, figsize=(16 if with_flops else 11, 4.2),
                             layout="constrained")
    ax_loss, ax_delta = axes[0], axes[1]
    ntp = groups.get("ntp")
    seeds, deltas = {}, 0
    for label in label_order(groups):
        rs, color = groups[label], colors[label]
        band = seed_band([r.curve for r in rs], "std")
        if band is None:
            continue
        seeds[label] = band.n
        _band(ax_loss, band.x, band, color)
        if with_flops:
            fpt = sum(r.training_flops_per_token for r in rs) / len(rs)
            _band(axes[2], [t * fpt for t in band.x], band, color)
        if ntp and label != "ntp":
            delta = seed_band(delta_curves(rs, ntp), "t95")
            if delta is not None:
                _band(ax_delta, delta.x, delta, color)
                deltas += 1
    ax_loss.set(xlabel="tokens seen", ylabel="held-out loss (nats/token)",
                title="held-out loss: mean over seeds, band ±1 std")
    ax_delta.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax_delta.set(xlabel="tokens seen", ylabel="held-out loss − NTP's (nats/token)",
                 title="minus NTP (same seed): mean, band 95% t-interval")
    if with_flops:
        axes[2].set(xlabel="training FLOPs (student + teacher)", ylabel="held-out loss (nats/token)",
                    title="against training FLOPs, band ±1 std")
    if not seeds:
        _no_data(ax_loss)
    if not deltas:
        _no_data(ax_delta, "no NTP run to compare with" if not ntp else "no other method")
    _legend(fig, label_order(groups), colors, seeds)
    fig.suptitle(f"scale {scale}: held-out loss (in-training estimate) against tokens")
    return _save(fig, path)


def plot_downstream(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    fig, (ax_curve, ax_tasks) = plt.subplots(1, 2, figsize=(13, 4.4), layout="constrained",
                                             gridspec_kw={"width_ratios": [1, 1.3]})
    labels = label_order(groups)
    curves = {label: downstream_curve(groups[label]) for label in labels}
    curves = {label: c for label, c in curves.items() if c is not None}
    span = max((max(c.x) - min(c.x) for c in curves.values()), default=0.0) or 1.0
    for j, (label, curve) in enumerate(curves.items()):
        dodge = (j - (len(curves) - 1) / 2) * 0.012 * span  # error bars side by side, not on top of each other
        ax_curve.errorbar([x + dodge for x in curve.x], curve.mean, yerr=[0.0 if s is None else s for s in curve.se],
                          color=colors[label], marker="o", markersize=3, capsize=3)
    avg_keys = sorted({tuple(accuracy_keys(r.downstream)) for rs in groups.values() for r in rs if r.downstream})
    chance = average_chance(list(avg_keys[0])) if len(avg_keys) == 1 else None
    if chance is not None:
        ax_curve.axhline(chance, color="black", linestyle=":", linewidth=1.2)
        ax_curve.annotate(f"chance {chance:.3f}", (0.01, chance), xycoords=("axes fraction", "data"),
                          xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax_curve.set(xlabel="tokens seen", ylabel="average accuracy",
                 title="average accuracy: mean over seeds ±1 combined SE")
    if not curves:
        _no_data(ax_curve)

    keys = [k for k in ACCURACY_KEYS + extra_accuracy_keys(runs)
            if any(k in r.downstream for rs in groups.values() for r in rs)]
    scores = {label: final_task_scores(groups[label], keys) for label in labels}
    width = 0.8 / max(1, len(labels))
    for i, key in enumerate(keys):
        for j, label in enumerate(labels):
            if key in scores[label]:
                m, se = scores[label][key]
                ax_tasks.bar(i - 0.4 + (j + 0.5) * width, m, width, yerr=0.0 if se is None else se, capsize=2,
                             color=colors[label], error_kw={"elinewidth": 0.8})
        if key in CHANCE:
            ax_tasks.hlines(CHANCE[key], i - 0.45, i + 0.45, color="black", linestyle=":", linewidth=1.2)
    ax_tasks.set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
    ax_tasks.set(ylabel="accuracy", title="each task at the last checkpoint: mean ±1 combined SE")
    if not keys:
        _no_data(ax_tasks)
    n = {label: len(groups[label]) for label in labels if curves.get(label) or any(scores[label].values())}
    chance_handle = Line2D([], [], color="black", linestyle=":", label="chance (1 / choices;\nits mean for the average)")
    _legend(fig, labels, colors, n, extra=[chance_handle] if chance is not None or any(k in CHANCE for k in keys) else [])
    fig.suptitle(f"scale {scale}: downstream accuracy (error bars: sqrt(s²/n + mean SE_i²), see the tables' note)")
    return _save(fig, path)


def plot_diagnostics(runs: list[Run], scale: str, path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    groups = {label: rs for (sc, label), rs in group(runs).items() if sc == scale}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    panels = [("val/readout_self_attn", None, "attention mass to own token",
               "read-out slot's attention to its own token\n(dotted: uniform over the prefix)"),
              ("val/loss_no_concept", "val/loss", "loss without concept code − loss (nats)",
               "what the concept code carries: loss increase\nwith every concept logit scaled to 0"),
              ("val/concept_acc", None, "top-1 concept accuracy", "concept prediction: top-1 = first label")]
    seeds: dict[str, int] = {}
    for ax, (key, minus, ylabel, title) in zip(axes, panels):
        drawn = 0
        for label in label_order(groups):
            band = seed_band(diagnostic_curves(groups[label], key, minus), "std")
            if band is None or not band.x:
                continue
            _band(ax, band.x, band, colors[label])
            seeds[label], drawn = band.n, drawn + 1
            if key == "val/readout_self_attn":
                uniform = seed_band(diagnostic_curves(groups[label], "val/readout_self_attn_uniform"), "std")
                if uniform is not None and uniform.x:
                    ax.plot(uniform.x, uniform.mean, color=colors[label], linestyle=":", linewidth=1.2)
        if minus:
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set(xlabel="tokens seen", ylabel=ylabel, title=title)
        if not drawn:
            _no_data(ax, "no run with this diagnostic")
    _legend(fig, label_order(groups), colors, seeds)
    fig.suptitle(f"scale {scale}: read-out diagnostics of the interleaving methods (mean over seeds, band ±1 std)")
    return _save(fig, path)


def plot_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors({r.label for r in runs})
    written = []
    for scale in sorted({r.scale for r in runs}):
        main = [r for r in runs if r.ablation is None]  # the methods; the ablations apart (with CoCoMix and NTP)
        written.append(plot_heldout(main, scale, out_dir / f"heldout_loss_{scale}.png", colors))
        written.append(plot_downstream(main, scale, out_dir / f"downstream_{scale}.png", colors))
        written.append(plot_diagnostics(main, scale, out_dir / f"diagnostics_{scale}.png", colors))
        if any(r.ablation and r.scale == scale for r in runs):
            ablations = [r for r in runs if r.ablation or r.label in ("ntp", "cocomix")]
            written.append(plot_heldout(ablations, scale, out_dir / f"heldout_loss_{scale}_ablations.png", colors))
            written.append(plot_diagnostics(ablations, scale, out_dir / f"diagnostics_{scale}_ablations.png", colors))
    return written
