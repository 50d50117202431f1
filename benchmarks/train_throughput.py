"""NTP training throughput (tokens/s) and MFU, side by side for several execution variants.

    python benchmarks/train_throughput.py                       # config/tiny.yaml model, CPU or GPU
    python benchmarks/train_throughput.py --config config/paper.yaml scale=69M --micro-batch 16

Each variant runs the real training step (method loss, backward, clip, fused AdamW on CUDA) on
random token blocks for `--warmup` untimed then `--steps` timed steps. Ratios are printed against
the first variant; results go to benchmarks/results/train_throughput-<device>-<date>.json with
hardware, package versions, commit and date.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cocomix.config import load_config  # noqa: E402
from cocomix.methods import Batch, get_method  # noqa: E402
from cocomix.device import peak_flops, sync  # noqa: E402

from benchmarks.common import config_parser, make_train_step, vocab_size, write_result  # noqa: E402



def measure(cfg, device, vocab, micro_batch, precision, compile_, warmup, steps):
    torch.manual_seed(0)
    method = get_method(cfg.method)
    model = method.build_model(cfg, vocab, 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    T = cfg.train.block_size
    batch = Batch(torch.randint(0, vocab, (micro_batch, T), device=device))

    step = make_train_step(method, model, batch, opt, ctx, forward=fwd)

    for _ in range(warmup):  # includes compilation
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    tok_s = steps * micro_batch * T / seconds
    peak = peak_flops(device)
    fpt = model.flops_per_token(T)
    return {
        "precision": precision,
        "compile": compile_,
        "micro_batch": micro_batch,
        "block_size": T,
        "params": model.num_params(),
        "flops_per_token": fpt,
        "step_ms": 1000 * seconds / steps,
        "tokens_per_s": tok_s,
        "mfu": tok_s * fpt / peak if peak else None,
    }


def main():
    ap = config_parser(__doc__, warmup=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = vocab_size(cfg, args.vocab)
    mb = args.micro_batch or cfg.train.micro_batch_size
    variants = [("fp32", False)]
    if device.type == "cuda":
        variants.append(("bf16", False))
    if args.compile:
        variants.append(("bf16" if device.type == "cuda" else "fp32", True))

    rows = []
    for precision, comp in variants:
        r = measure(cfg, device, vocab, mb, precision, comp, args.warmup, args.steps)
        rows.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
        print(f"{precision:>5} compile={comp!s:5} {r['tokens_per_s']:>12,.0f} tok/s  {r['step_ms']:8.1f} ms/step  "
              f"MFU {mfu}  ratio {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")

    write_result("train_throughput", {
        "config": args.config,
        "overrides": args.overrides,
        "model": {"n_embd": cfg.model.n_embd, "n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head, "vocab": vocab},
        "results": rows,
        "ratios_vs_first": [r["tokens_per_s"] / rows[0]["tokens_per_s"] for r in rows],
    }, args.out)


if __name__ == "__main__":
    main()
