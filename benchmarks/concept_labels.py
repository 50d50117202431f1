"""Concept labels: extraction throughput, and cached against online labels per training step.

    python benchmarks/concept_labels.py                                   # config/tiny.yaml, CPU or GPU
    python benchmarks/concept_labels.py --config config/paper.yaml scale=69M --teacher-layers 12

Measured, for the config's block size, micro-batch, SAE size (sae.n_latents, sae.k) and K_attr:

1. extraction: `concept_labels` (teacher forward + backward + SAE encode + attribution) on batches
   of `concept.extract_batch_size` blocks, as `extract-concepts` runs it (at
   `concept.label_precision`, fp32 by default); reported in tokens/s.
2. per micro-batch, side by side: "cached" = `LabelCache.get` of random blocks from a label file
   on disk (the memmap read a training step does) against "online" = `concept_labels` on the
   micro-batch (fp32, as CoCoMix's online mode runs it).
3. a full CoCoMix training step (`cocomix.concept_mixing`: loss, backward, clip, AdamW) with cached
   labels against online labels.

The teacher is a `model.*`-shaped backbone with `--teacher-layers` blocks (random weights: the cost
does not depend on them) unless `teacher.path` is set; the SAE is random with the config's sizes.
Variants are timed round-robin so a shared machine's load hits them alike; medians are reported.
Results: benchmarks/results/concept_labels-<device>-<date>.json (hardware, versions, commit, date).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cocomix.concepts import LabelCache, concept_labels, label_dtype, label_precision  # noqa: E402
from cocomix.config import load_config  # noqa: E402
from cocomix.device import autocast, sync  # noqa: E402
from cocomix.methods import Batch, get_method  # noqa: E402
from cocomix.model import CocomixConfig, CocomixForCausalLM  # noqa: E402
from cocomix.sae import TopKSAE  # noqa: E402
from cocomix.teacher import load_teacher  # noqa: E402

from benchmarks.common import config_parser, vocab_size, write_result  # noqa: E402



def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_teacher(cfg, layers, vocab, device):
    if cfg.teacher.path:
        return load_teacher(cfg, device)
    m = cfg.model
    conf = CocomixConfig(vocab_size=vocab, n_positions=cfg.train.block_size, n_embd=m.n_embd, n_layer=layers,
                         n_head=m.n_head, dropout=0.0)
    torch.manual_seed(0)
    return CocomixForCausalLM(conf).to(device).eval().requires_grad_(False)


def fake_cache(folder: Path, n_blocks: int, cfg) -> LabelCache:
    """A label file of random labels in the real layout, opened through the real reader."""
    T, k = cfg.train.block_size, cfg.concept.k_attr
    dtype = label_dtype(cfg.sae.n_latents)
    arr = np.random.default_rng(0).integers(0, cfg.sae.n_latents, (n_blocks, T, k)).astype(dtype)
    (folder / "train.labels.bin").write_bytes(arr.tobytes())
    manifest = {"k_attr": k, "block_size": T, "dtype": dtype.str,
                "splits": {"train": {"file": "train.labels.bin", "n_blocks": n_blocks, "bytes": arr.nbytes}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return LabelCache.from_folder(folder)


def main():
    ap = config_parser(__doc__, warmup=2)
    ap.add_argument("--teacher-layers", type=int, default=None, help="default: model.n_layer")
    ap.add_argument("--cache-blocks", type=int, default=4096, help="blocks in the on-disk label file")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = vocab_size(cfg, args.vocab)
    layers = args.teacher_layers or cfg.model.n_layer
    mb = args.micro_batch or cfg.train.micro_batch_size
    T, eb = cfg.train.block_size, cfg.concept.extract_batch_size
    teacher = build_teacher(cfg, layers, vocab, device)
    torch.manual_seed(1)
    sae = TopKSAE(teacher.config.n_embd, cfg.sae.n_latents, cfg.sae.k)
    with torch.no_grad():
        sae.encoder.weight.normal_()
        sae.decoder.weight.copy_(sae.encoder.weight.t())
        sae.normalize_decoder_()
    sae = sae.to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    extract_ids = torch.randint(0, vocab, (eb, T), generator=gen).to(device)
    micro_ids = torch.randint(0, vocab, (mb, T), generator=gen).to(device)

    tmp = tempfile.TemporaryDirectory()
    cache = fake_cache(Path(tmp.name), args.cache_blocks, cfg)
    rng = np.random.default_rng(1)

    def extract():
        with label_precision(device, cfg.concept.label_precision):
            concept_labels(teacher, sae, extract_ids, cfg.concept, cfg.sae.layer)

    def cached_labels():
        return cache.get("train", rng.integers(0, args.cache_blocks, mb)).to(device)

    def online_labels():
        return concept_labels(teacher, sae, micro_ids, cfg.concept, cfg.sae.layer)

    variants = {"extract_batch": extract, "labels_cached": cached_labels, "labels_online": online_labels}

    # A full CoCoMix step, if the method is there (issue 4), with each label source.
    step_info = None
    try:
        method = get_method("cocomix")
    except (ValueError, ImportError):
        method = None
    if method is not None:
        model = method.build_model(cfg, vocab, 0).to(device)
        method.cfg, method.teacher, method.sae = cfg, teacher, sae  # what setup() gives an online run
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")

        def train_step(online: bool):
            extras = {} if online else {"concept_labels": cached_labels()}
            with autocast(device, cfg.train.precision):  # bf16 on CUDA, as training
                loss, _ = method.loss(model, Batch(micro_ids, extras))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        variants["step_cached"] = lambda: train_step(False)
        variants["step_online"] = lambda: train_step(True)
        step_info = {"student_params": model.num_params(), "student_flops_per_token": model.flops_per_token(T)}

    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # round-robin
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    tmp.cleanup()

    results = {
        "extract_tokens_per_s": eb * T / (ms["extract_batch"] / 1000),
        "labels_cached_ms": ms["labels_cached"],
        "labels_online_ms": ms["labels_online"],
        "labels_online_over_cached": ms["labels_online"] / ms["labels_cached"],
    }
    print(f"extraction: {results['extract_tokens_per_s']:,.0f} tokens/s (batch {eb} x {T})")
    print(f"labels per micro-batch ({mb} x {T}): cached {ms['labels_cached']:.2f} ms  online {ms['labels_online']:.1f} ms  "
          f"ratio online/cached {results['labels_online_over_cached']:.0f}x")
    if step_info is not None:
        results.update({"step_cached_ms": ms["step_cached"], "step_online_ms": ms["step_online"],
                        "step_online_over_cached": ms["step_online"] / ms["step_cached"], **step_info})
        print(f"CoCoMix training step: cached labels {ms['step_cached']:.1f} ms  online labels {ms['step_online']:.1f} ms  "
              f"ratio {results['step_online_over_cached']:.2f}x")

    write_result("concept_labels", {
        "config": args.config,
        "overrides": args.overrides,
        "setup": {"teacher": cfg.teacher.path or f"random {layers}-layer, {cfg.model.n_embd} wide", "vocab": vocab,
                  "block_size": T, "micro_batch": mb, "extract_batch_size": eb, "sae_layer": cfg.sae.layer,
                  "n_latents": cfg.sae.n_latents, "sae_k": cfg.sae.k, "k_attr": cfg.concept.k_attr,
                  "scoring": cfg.concept.scoring, "loss_scope": cfg.concept.loss_scope,
                  "student": {"n_embd": cfg.model.n_embd, "n_layer": cfg.model.n_layer},
                  "extraction_precision": cfg.concept.label_precision,
                  "repeats": args.repeats, "statistic": "median"},
        "results": results,
        "raw_ms": {name: [1000 * t for t in v] for name, v in times.items()},
    }, args.out)


if __name__ == "__main__":
    main()
