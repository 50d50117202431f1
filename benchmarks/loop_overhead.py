"""The training loop's own overhead: `Trainer.train` against the bare `train_step`, side by side.

    python benchmarks/loop_overhead.py                      # config/tiny.yaml, as shipped
    python benchmarks/loop_overhead.py --config .test/config.yaml --steps 64

The loop is everything a run does around the step: the seeded data order, block assembly and label
lookup (prefetched in a thread), the NaN guard's device flag, metrics and their host sync at log
steps, MLflow and metrics.jsonl. The bare step is `cocomix.trainer.train_step` on one fixed,
already assembled batch, with the same model and optimizer. Both leave out the first step (warm-up)
and evaluation and checkpoints (the loop's tokens/s excludes them by design: `Trainer.untimed`).
Each repeat times the bare step just before and just after the loop (same weights and optimizer);
the median over repeats of loop / mean(bare) is the overhead (target: under 5%). Writes
benchmarks/results/loop_overhead-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from cocomix.device import sync  # noqa: E402
from cocomix.config import load_config  # noqa: E402
from cocomix.data.shards import prepare_data  # noqa: E402
from cocomix.trainer import Trainer, lr_at, train_step  # noqa: E402


def loop(trainer: Trainer) -> float:
    """Seconds per step of the loop, over the steps its throughput counts."""
    final = trainer.train()
    return trainer.tokens_per_step / final["tokens_per_s"]


def bare(trainer: Trainer, steps: int) -> float:
    """Seconds per step of `train_step` alone, on the run's first batch, model and optimizer."""
    t = trainer.cfg.train
    micro = trainer.micro_batches_at(0)

    def step(i):
        train_step(trainer.model, trainer.method, trainer.optimizer, micro,
                   lr=lr_at(i, trainer.total_steps, trainer.warmup_steps, t.lr, t.min_lr_ratio), grad_clip=t.grad_clip,
                   autocast=trainer.autocast, train_model=trainer.train_model, dist=trainer.dist)

    step(0)  # warm-up, as the loop's first step
    sync(trainer.device)
    t0 = time.perf_counter()
    for i in range(1, steps):
        step(i)
    sync(trainer.device)
    return (time.perf_counter() - t0) / (steps - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config/tiny.yaml"))
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="loop_overhead-") as tmp:
        base = load_config(args.config, [f"results_dir={tmp}", *args.overrides])
        budget = args.steps * base.train.global_batch_size * base.train.block_size
        shipped = load_config(args.config, args.overrides).data_dir  # reuse a prepared folder if there is one
        data_dir = shipped if (shipped / "manifest.json").exists() else prepare_data(base, progress=False)
        loop_s, bare_s = [], []
        for r in range(args.repeats):
            cfg = load_config(args.config, [f"results_dir={tmp}/{r}", f"data.dir={data_dir}", f"train.tokens={budget}",
                                            f"eval.every_tokens={budget}", f"checkpoint.every_tokens={budget}",
                                            "train.resume=never", *args.overrides])
            # The bare step right before and right after the loop, on the same model and optimizer: their
            # mean is the reference, so a machine that speeds up or slows down mid-repeat cancels out.
            trainer = Trainer(cfg, progress=False)
            before = bare(trainer, args.steps)
            loop_s.append(loop(trainer))
            bare_s.append((before + bare(trainer, args.steps)) / 2)
            print(f"repeat {r}: loop {1000 * loop_s[-1]:.2f} ms/step, bare step {1000 * bare_s[-1]:.2f} ms/step, "
                  f"overhead {100 * (loop_s[-1] / bare_s[-1] - 1):+.2f}%", flush=True)
        # Each repeat's loop and bare step ran back to back on the same weights: the median of their ratios.
        overhead = statistics.median(a / b for a, b in zip(loop_s, bare_s)) - 1
        print(f"median: loop {1000 * statistics.median(loop_s):.2f} ms/step, bare {1000 * statistics.median(bare_s):.2f} "
              f"ms/step; median overhead {100 * overhead:+.2f}% (target < 5%)")
        write_result("loop_overhead", {
            "config": args.config, "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
            "tokens_per_step": base.train.global_batch_size * base.train.block_size,
            "log_every_steps": base.train.log_every_steps, "tracking": base.tracking.enabled,
            "loop_ms_per_step": [1000 * s for s in loop_s], "bare_ms_per_step": [1000 * s for s in bare_s],
            "median_overhead": overhead, "target": 0.05, "torch_threads": torch.get_num_threads(),
        }, args.out)


if __name__ == "__main__":
    main()
