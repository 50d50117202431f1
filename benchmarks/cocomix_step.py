"""CoCoMix's cost, measured side by side: (1) a full training step of CoCoMix over NTP at equal width,
(2) sparse-gather compression (ours) against the dense C-wide matmul of the official code.

    python benchmarks/cocomix_step.py                                  # config/tiny.yaml, CPU or GPU
    python benchmarks/cocomix_step.py --config config/paper.yaml scale=69M --micro-batch 8

(1) runs the real method losses (CoCoMix with random concept labels in [0, sae.n_latents)), backward,
clipping and AdamW on random token blocks. (2) times forward + backward of W @ TopK(z) for
`--tokens` positions at (C, k, d) = (sae.n_latents, concept.k, model.n_embd) of the config and at
the paper's 69M (32768, 32, 512):
"sparse" gathers k rows (`cocomix.slots.sparse_compress`), "dense" scatters TopK(z) into a C-wide
zero vector and multiplies by the full matrix, as the official `compress_layer` does. Variants are
timed round-robin (alternating repeats) so a shared machine's load hits both alike; the median
repeat is reported. Results: benchmarks/results/cocomix_step-<device>-<date>.json with hardware,
versions, commit and date.
"""

from __future__ import annotations

import os
import statistics
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
from cocomix.slots import sparse_compress  # noqa: E402

from benchmarks.common import config_parser, make_train_step, vocab_size, write_result  # noqa: E402
from cocomix.device import sync  # noqa: E402


PAPER_69M_COMPRESSION = (32768, 32, 512)  # (C, k, d) of CoCoMix 69M (spec 1.4, 2)



def round_robin(fns: dict, warmup: int, repeats: int, device) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step_fn(cfg, method_name, device, vocab, micro_batch, precision):
    torch.manual_seed(0)
    method = get_method(method_name)
    method.cfg = cfg  # what setup() would store; labels are supplied below instead of a cache
    model = method.build_model(cfg, vocab, 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    T = cfg.train.block_size
    extras = {}
    if method_name == "cocomix":
        labels = torch.randint(0, cfg.sae.n_latents, (micro_batch, T, cfg.concept.k_attr), device=device)
        labels[:, -1] = -1
        extras["concept_labels"] = labels
    batch = Batch(torch.randint(0, vocab, (micro_batch, T), device=device), extras)

    return make_train_step(method, model, batch, opt, ctx), model


def compression_fns(n_latents, k, d, tokens, device):
    gen = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(n_latents, d, device=device, generator=gen).mul_(0.02).requires_grad_()  # (C, d)
    z = torch.randn(tokens, n_latents, device=device, generator=gen).requires_grad_()         # (N, C)
    values, indices = z.detach().topk(k, dim=-1)
    values.requires_grad_()
    upstream = torch.randn(tokens, d, device=device, generator=gen)

    def sparse():
        out = sparse_compress(values, indices, table)  # (N, d)
        torch.autograd.backward(out, upstream)
        return out

    def dense():
        code = torch.zeros(tokens, n_latents, device=device).scatter(-1, indices, values)  # (N, C)
        out = code @ table
        torch.autograd.backward(out, upstream)
        return out

    max_diff = (sparse().detach() - dense().detach()).abs().max().item()
    return {"sparse_gather": sparse, "dense_matmul": dense}, max_diff


def main():
    ap = config_parser(__doc__, warmup=2)
    ap.add_argument("--tokens", type=int, default=4096, help="positions in the compression benchmark")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    cfg = load_config(args.config, ["method=ntp", *args.overrides])  # NTP's width for both: equal width
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    vocab = vocab_size(cfg, args.vocab)
    mb = args.micro_batch or cfg.train.micro_batch_size
    T = cfg.train.block_size

    # (1) training step, CoCoMix over NTP at the same width
    steps, models = {}, {}
    for name in ("ntp", "cocomix"):
        steps[name], models[name] = train_step_fn(cfg, name, device, vocab, mb, precision)
    step_s = round_robin(steps, args.warmup, args.repeats, device)
    step_rows = {name: {"step_ms": 1000 * s, "tokens_per_s": mb * T / s, "params": models[name].num_params(),
                        "flops_per_token": models[name].flops_per_token(T)} for name, s in step_s.items()}
    step_ratio = step_s["cocomix"] / step_s["ntp"]
    flops_ratio = models["cocomix"].flops_per_token(T) / models["ntp"].flops_per_token(T)
    for name, row in step_rows.items():
        print(f"{name:>8} d={cfg.model.n_embd}: {row['step_ms']:9.1f} ms/step  {row['tokens_per_s']:>10,.0f} tok/s")
    print(f"CoCoMix / NTP step time: {step_ratio:.2f}x (FLOPs per token ratio {flops_ratio:.2f}x)")
    del models, steps

    # (2) compression, sparse gather vs dense C-wide matmul: at the config's sizes and the paper's 69M
    compression = []
    for C, k, d in dict.fromkeys([(cfg.sae.n_latents, cfg.concept.k, cfg.model.n_embd), PAPER_69M_COMPRESSION]):
        fns, max_diff = compression_fns(C, k, d, args.tokens, device)
        comp_s = round_robin(fns, args.warmup, args.repeats, device)
        speedup = comp_s["dense_matmul"] / comp_s["sparse_gather"]
        for name, s in comp_s.items():
            print(f"{name:>14} C={C} k={k} d={d} N={args.tokens}: {1000 * s:9.2f} ms (forward + backward)")
        print(f"sparse over dense compression speed-up: {speedup:.1f}x (max |diff| {max_diff:.1e})")
        compression.append({"n_concepts": C, "k": k, "d": d, "tokens": args.tokens,
                            "ms": {name: 1000 * s for name, s in comp_s.items()},
                            "sparse_speedup_over_dense": speedup, "max_abs_diff": max_diff})

    write_result("cocomix_step", {
        "config": args.config,
        "overrides": args.overrides,
        "precision": precision,
        "model": {"n_embd": cfg.model.n_embd, "n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head, "vocab": vocab,
                  "block_size": T, "micro_batch": mb, "insert_layer": cfg.concept.insert_layer,
                  "n_concepts": cfg.sae.n_latents, "concept_k": cfg.concept.k, "k_attr": cfg.concept.k_attr},
        "train_step": step_rows,
        "cocomix_over_ntp_step_time": step_ratio,
        "cocomix_over_ntp_flops_per_token": flops_ratio,
        "compression": compression,
        "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median, round-robin"},
    }, args.out)


if __name__ == "__main__":
    main()
