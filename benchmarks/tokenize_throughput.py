"""Tokenizing a corpus: the data pipeline's batch encoder against per-document encoding.

    python benchmarks/tokenize_throughput.py                          # config/gutenberg-cpu.yaml (needs ../shared/data)
    python benchmarks/tokenize_throughput.py --config config/tiny.yaml --max-chars 2e6   # the synthetic corpus

The same documents (the config's corpus, the first `--max-chars` characters of it) are encoded three
ways, with the config's tokenizer (a byte-level BPE trained on the first `--train-chars` of them, as
`prepare-data` trains one):

1. `call`: the transformers tokenizer called on each document (`tok(text)["input_ids"]`), the loop most
   scripts write;
2. `encode`: the Rust backend's `encode` on each document;
3. `batch`: what `cocomix prepare-data` runs (cocomix/data/shards.py): the backend's `encode_batch` on
   batches of 256 documents or 4M characters, which the tokenizers library spreads over the cores.

The three must give identical ids (checked). The variants are timed round-robin, `--repeats` times, so a
shared machine's load hits them alike; medians in characters and tokens per second, and the ratios of
`batch` to the other two, are printed. The pipeline has used `encode_batch` since its first commit
(4af634a), for every source; `call` is the loop a script without it would run. Results:
benchmarks/results/tokenize_throughput-<device>-<date>.json (hardware, versions, commit, date).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cocomix.config import load_config  # noqa: E402
from cocomix.data import shards  # noqa: E402
from cocomix.data.sources import iter_documents  # noqa: E402
from cocomix.data.tokenizer import train_bpe  # noqa: E402

from benchmarks.common import write_result  # noqa: E402


def documents(cfg, max_chars: int) -> list[str]:
    texts, used = [], 0
    for doc in iter_documents(cfg.data):
        texts.append(doc.text[: max_chars - used])
        used += len(texts[-1])
        if used >= max_chars:
            break
    return texts


def batches(texts: list[str]):
    """The pipeline's batching (shards._write_shards): 256 documents or 4M characters."""
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) >= shards._ENCODE_BATCH_DOCS or chars >= shards._ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config/gutenberg-cpu.yaml"))
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--max-chars", type=float, default=2e7)
    ap.add_argument("--train-chars", type=float, default=2e6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    texts = documents(cfg, int(args.max_chars))
    chars = sum(map(len, texts))
    tok = train_bpe(texts, cfg.tokenizer.vocab_size, max_chars=int(args.train_chars))
    backend = tok.backend_tokenizer
    variants = {
        "call": lambda: [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "encode": lambda: [backend.encode(t, add_special_tokens=False).ids for t in texts],
        "batch": lambda: [e.ids for b in batches(texts) for e in backend.encode_batch(b, add_special_tokens=False)],
    }
    ids = {name: fn() for name, fn in variants.items()}  # warm-up, and the equality check
    assert ids["call"] == ids["encode"] == ids["batch"], "the three paths gave different ids"
    tokens = sum(map(len, ids["batch"]))
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"{len(texts):,} documents, {chars:,} characters, {tokens:,} tokens ({cfg.data.source}, "
          f"vocab {cfg.tokenizer.vocab_size}, {os.cpu_count()} cores)")
    for name, s in median.items():
        print(f"  {name:7s} {s:7.2f} s  {chars / s / 1e6:6.2f} M chars/s  {tokens / s / 1e6:6.2f} M tokens/s")
    ratios = {f"batch_vs_{name}": median[name] / median["batch"] for name in ("call", "encode")}
    print("  batch is " + ", ".join(f"{r:.2f}x {k.split('_')[-1]}" for k, r in ratios.items()))
    write_result("tokenize_throughput", {
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT)
        else args.config, "overrides": args.overrides, "source": cfg.data.source, "documents": len(texts),
        "chars": chars, "tokens": tokens, "vocab_size": cfg.tokenizer.vocab_size, "repeats": args.repeats,
        "seconds": times, "median_s": median, "chars_per_s": {k: chars / s for k, s in median.items()},
        "tokens_per_s": {k: tokens / s for k, s in median.items()}, **ratios,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default"),
    }, args.out)


if __name__ == "__main__":
    main()
