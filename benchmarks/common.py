"""Helpers shared by the benchmark scripts: the trainer's own step bound to one batch, the shared
argument parser and the result writer."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

import torch

from cocomix.files import atomic_write_json
from cocomix.records import environment_info
from cocomix.trainer import train_step

ROOT = Path(__file__).resolve().parents[1]


def make_train_step(method, model, batch, optimizer, autocast, forward=None):
    """`cocomix.trainer.train_step` (what every run executes: method loss, backward, clip at 1.0,
    AdamW) on one micro-batch. `forward` (e.g. a torch.compile'd `model`) runs the loss."""
    return lambda: train_step(model, method, optimizer, [batch], lr=1e-4, grad_clip=1.0, autocast=autocast,
                              train_model=forward)


def config_parser(doc: str, warmup: int = 2):
    """The arguments every model benchmark takes: a config, dotted overrides, vocabulary, micro-batch,
    warm-up and where results go."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config/tiny.yaml"))
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--vocab", type=int, default=None, help="default: tokenizer.vocab_size (50257 with tokenizer.path)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    return ap


def vocab_size(cfg, override: int | None) -> int:
    return override or cfg.model.vocab_size or (50257 if cfg.tokenizer.path else cfg.tokenizer.vocab_size)


def write_result(benchmark: str, body: dict, out_dir) -> Path:
    """benchmarks/results/<benchmark>-<device>-<date>.json: `body` plus date, hardware, package
    versions and commit (what makes a measurement comparable), written atomically."""
    env = environment_info()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"benchmark": benchmark, "date": date, **body,
              "hardware": {"device": env["device"], "cpu_count": os.cpu_count(), "machine": platform.machine(),
                           "torch_threads": torch.get_num_threads()},
              "versions": {k: env[k] for k in ("python", "torch", "transformers")},
              "commit": env["git_commit"]}
    device = env["device"].replace(" ", "_").replace("/", "_") or "cpu"
    path = atomic_write_json(Path(out_dir) / f"{benchmark}-{device}-{date[:10]}.json", result)
    print(f"wrote {path}")
    return path
