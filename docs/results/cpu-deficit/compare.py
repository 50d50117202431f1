"""Paired comparisons across the deficit experiments (same data, seeds and NTP runs; each variant in
its own experiment folder): final held-out loss (final_metrics.json val/loss) of run A minus run B of
the same seed, mean +- 95% t half-width, and the minimum detectable effect at 80% power.

    python docs/results/cpu-deficit/compare.py   # from the folder holding results/ (see README.md)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: evals.report.stats

from evals.report.stats import mde80, mean_ci95, mean_std  # noqa: E402

SEEDS = (0, 1, 2)
# (label, experiment A, run prefix A, experiment B, run prefix B)
COMPARISONS = [
    ("CoCoMix - NTP (tiny)", "deficit-tiny", "cocomix", "deficit-tiny", "ntp"),
    ("H3 init_x2 - NTP (tiny)", "deficit-tiny", "init_x2", "deficit-tiny", "ntp"),
    ("H3 init_x2 - CoCoMix (tiny)", "deficit-tiny", "init_x2", "deficit-tiny", "cocomix"),
    ("H2 token_readout - NTP (tiny)", "deficit-tiny", "token_readout", "deficit-tiny", "ntp"),
    ("H2 token_readout - CoCoMix (tiny)", "deficit-tiny", "token_readout", "deficit-tiny", "cocomix"),
    ("H5 mid-layer SAE: CoCoMix - NTP (tiny)", "deficit-tiny-h5", "cocomix", "deficit-tiny", "ntp"),
    ("H5 mid-layer SAE: CoCoMix - CoCoMix (tiny)", "deficit-tiny-h5", "cocomix", "deficit-tiny", "cocomix"),
    ("H4 400k teacher: CoCoMix - NTP (tiny)", "deficit-tiny-h4", "cocomix", "deficit-tiny", "ntp"),
    ("H4 400k teacher: CoCoMix - CoCoMix (tiny)", "deficit-tiny-h4", "cocomix", "deficit-tiny", "cocomix"),
    ("CoCoMix - NTP (gutenberg-cpu)", "deficit-gutenberg-cpu", "cocomix", "deficit-gutenberg-cpu", "ntp"),
    ("H3 init_x2 - NTP (gutenberg-cpu)", "deficit-gutenberg-cpu", "init_x2", "deficit-gutenberg-cpu", "ntp"),
    ("H3 init_x2 - CoCoMix (gutenberg-cpu)", "deficit-gutenberg-cpu", "init_x2", "deficit-gutenberg-cpu", "cocomix"),
]


def loss(exp: str, prefix: str, seed: int) -> float | None:
    path = Path("results") / exp / "runs" / f"{prefix}-base-s{seed}" / "final_metrics.json"
    return json.loads(path.read_text())["val/loss"] if path.is_file() else None


def main() -> None:
    print("| comparison | pairs | Δ held-out loss (nats) | MDE (80%) |")
    print("|---|---|---|---|")
    for label, ea, pa, eb, pb in COMPARISONS:
        diffs = [a - b for s in SEEDS if (a := loss(ea, pa, s)) is not None and (b := loss(eb, pb, s)) is not None]
        if not diffs:
            print(f"| {label} | 0 | not run | – |")
            continue
        mean, ci = mean_ci95(diffs)
        sd = mean_std(diffs)[1]
        mde = mde80(sd, len(diffs)) if sd else None
        cell = f"{mean:+.3f}" + (f" ± {ci:.3f}" if ci is not None else "")
        print(f"| {label} | {len(diffs)} | {cell} | {f'{mde:.3f}' if mde else '–'} |")


if __name__ == "__main__":
    main()
