"""The `cocomix` command line: thin wrappers over the library.

    cocomix prepare-data --config config/tiny.yaml
    cocomix train --config config/tiny.yaml --method ntp [model.n_embd=128 ...]
    torchrun --nproc_per_node 2 -m cocomix.cli train --config ...   # DDP

Any bad input ends with one line on stderr (`cocomix: error: ...`) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys

# Never let a bad local path turn into ~25 s of hub retries (shared/notes/ecosystem-facts.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_embd=128 train.tokens=1e6")


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from cocomix.config import load_config

    return load_config(args.config, list(extra or []) + list(args.overrides))


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from cocomix.data.shards import prepare_data

    cfg = _load(args)
    out = prepare_data(cfg, force=args.force)
    print(out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from cocomix.trainer import train

    hf_logging.disable_progress_bar()  # one bar per checkpoint save is noise; ours shows progress

    extra = []
    if args.method:
        extra.append(f"method={args.method}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    cfg = _load(args, extra)
    final = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {cfg.resolved_run_name} step {final['step']} tokens {final['tokens_seen']:,} "
            f"val/loss {final['val/loss']:.4f} val/ppl {final['val/ppl']:.2f} -> {final['checkpoint']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocomix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-data", help="corpus -> tokenizer -> token shards + manifest")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching manifest exists")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train one (method, scale, seed) run; resumes automatically")
    _add_config_args(p)
    p.add_argument("--method", default=None, help="shorthand for method=...")
    p.add_argument("--seed", type=int, default=None, help="shorthand for seed=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cocomix.config import ConfigError
    from cocomix.data import DataError

    args = build_parser().parse_args(argv)
    try:
        from cocomix.trainer import TrainingError
    except ImportError:  # pragma: no cover - torch missing
        TrainingError = RuntimeError  # noqa: N806
    try:
        return args.func(args)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"cocomix: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("cocomix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
