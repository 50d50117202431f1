"""Concept labels at lower precision: how many equal fp32's (`concept.label_precision`, cocomix/concepts.py).

    python benchmarks/label_precision.py --config config/tiny.yaml [overrides] [--blocks 512]

Labels of the first `--blocks` validation blocks of an experiment whose teacher and SAE exist
(trained by its DAG), computed as `extract-concepts` computes them (its chunks of
`concept.extract_batch_size` blocks) at fp32 (the default: TF32 off, autocast off), tf32 and bf16,
and compared with fp32 by `label_agreement` over the positions labelled in both: exact (the whole
K_attr tuple, in order), top1 (the best label), overlap (the K_attr sets, order ignored). On a CPU
tf32 is fp32 (no TF32 there) and the script says so rather than measuring it. Timing per precision
is the median of the chunks. JSON: benchmarks/results/label_precision-<experiment>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from cocomix.concepts import LABEL_PRECISIONS, _chunk_labeller, _sentinel, label_agreement, label_dtype  # noqa: E402
from cocomix.config import load_config  # noqa: E402
from cocomix.data.shards import TokenBlocks  # noqa: E402


def measure(config: str, overrides: list[str], blocks: int, device: torch.device) -> dict:
    """Labels of the first `blocks` val blocks at each precision, their agreement with fp32 and time."""
    cfg = load_config(config, overrides)
    val = TokenBlocks(cfg.data_dir, "val", cfg.train.block_size)
    n = min(blocks, len(val))
    dtype = label_dtype(cfg.sae.n_latents)
    step = cfg.concept.extract_batch_size
    chunks = [range(a, min(n, a + step)) for a in range(0, n, step)]
    labels, seconds = {}, {}
    for precision in LABEL_PRECISIONS:
        if precision == "tf32" and device.type != "cuda":
            continue  # TF32 is a CUDA matmul mode: on a CPU it is fp32
        c = load_config(config, [*overrides, f"concept.label_precision={precision}"])
        label_bytes = _chunk_labeller(c, device, dtype)
        raw, times = [], []
        for r in chunks:
            start = time.perf_counter()
            out = label_bytes(val.get_batch(r))
            times.append(time.perf_counter() - start)
            raw.append(np.frombuffer(out, dtype=dtype).reshape(len(r), -1, cfg.concept.k_attr))
        arr = torch.from_numpy(np.concatenate(raw).astype(np.int64))
        labels[precision] = arr.masked_fill_(arr == _sentinel(dtype), -1)
        seconds[precision] = statistics.median(times)
    rows = {}
    for precision, got in labels.items():
        rows[precision] = {**label_agreement(got, labels["fp32"]),
                           "s_per_chunk": seconds[precision],
                           "tokens_per_s": step * cfg.train.block_size / seconds[precision]}
    return {"blocks": n, "positions": int((labels["fp32"] >= 0).all(-1).sum()), "chunk_blocks": step,
            "tf32": "measured" if "tf32" in labels else "not measured: a CPU has no TF32 (it is fp32 there)",
            "precisions": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config/tiny.yaml"))
    p.add_argument("--blocks", type=int, default=512, help="validation blocks labelled (default 512)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"config": args.config, "overrides": args.overrides,
              "experiment": cfg.experiment, "teacher": str(cfg.teacher.path),
              "sae_layer": cfg.sae.layer, "n_latents": cfg.sae.n_latents, "k_attr": cfg.concept.k_attr,
              **measure(args.config, args.overrides, args.blocks, device)}
    for precision, row in result["precisions"].items():
        print(f"{precision:>5}: exact {row['exact']:.3f}  top1 {row['top1']:.3f}  overlap {row['overlap']:.3f}  "
              f"{row['tokens_per_s']:,.0f} tok/s")
    print(f"tf32: {result['tf32']}")
    write_result(f"label_precision-{cfg.experiment}", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
