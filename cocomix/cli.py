"""The `cocomix` command line: thin wrappers over the library.

    cocomix config --config config/tiny.yaml [model.n_embd=128 ...]   # the resolved config, documented
    cocomix prepare-data --config config/tiny.yaml
    cocomix train --config config/tiny.yaml --method ntp [model.n_embd=128 ...]
    cocomix inspect <run or checkpoint> --prompt "..." --out <folder>
    cocomix steer <run or checkpoint> --prompt "..." --concepts 17 --factor 10 --out <folder>
    cocomix export <run or checkpoint> <folder>    # a Hub-ready model folder with its model card
    torchrun --nproc_per_node 2 -m cocomix.cli train --config ...   # DDP

Any bad input ends with one line on stderr (`cocomix: error: ...`) and a non-zero exit.

Arguments and the config are checked before torch or transformers is imported: each command first
resolves its config (and any other pure check), and only then imports the library code it runs, so
a typo in a key fails in a fraction of a second (benchmarks/cli_startup.py measures it). Keep this
module's top-level imports stdlib + `cocomix.config`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Never let a bad local path turn into ~25 s of hub retries (shared/notes/ecosystem-facts.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cocomix.config import ConfigError, describe_config, load_config, parse_overrides  # noqa: E402
from cocomix.gpus import claim_for_process  # noqa: E402


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_embd=128 train.tokens=1e6")


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    return load_config(args.config, list(extra or []) + list(args.overrides))


def _check_method(cfg):
    """The run's method: its name is the method registry's to check (config.py does not know the list)."""
    from cocomix.methods import get_method  # lazy: torch after the config is valid

    return get_method(cfg.method)


def _no_hf_bars() -> None:
    """No transformers progress bars (checkpoint saves, the teacher's "Loading weights"): in a job log
    each is a carriage-return line; the commands print their own progress."""
    from transformers.utils import logging as hf_logging  # lazy: only the commands that load models

    hf_logging.disable_progress_bar()


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(describe_config(cfg), end="")
    if args.slot_ratio:
        import torch  # lazy: torch only for this line

        from cocomix.diagnostics import slot_norm_ratio  # lazy: torch only here

        torch.manual_seed(cfg.seed)  # the run's init (the vocabulary plays no part: 8 rows)
        ratio = slot_norm_ratio(_check_method(cfg).build_model(cfg, vocab_size=8, eos_id=0))
        c = cfg.concept
        print(f"# concept slot / token norm at init: {ratio:.3f} (d {cfg.model.n_embd}, C {cfg.sae.n_latents}, "
              f"k {c.k}, init_std {cfg.model.init_std}, concept.init_scale {c.init_scale})" if ratio is not None
              else f"# concept slot / token norm at init: none (method {cfg.method} has no concept slot)")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cocomix.data.shards import prepare_data  # lazy: tokenizers after the config is valid

    out = prepare_data(cfg, force=args.force)
    print(out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    extra = []
    if args.tuned:  # a tuning study's values first: the run's own overrides (an ablation's) win over them
        from cocomix.tune import tuned_overrides  # lazy: only for tuned runs

        extra += tuned_overrides(args.tuned)
    if args.method:
        extra.append(f"method={args.method}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    cfg = _load(args, extra)
    method = _check_method(cfg)
    if args.match_flops:  # a compute-matched arm: its budget spends the matched run's FLOPs
        from cocomix.compute import matched_tokens, matched_total, student_flops_per_token  # lazy: torch

        over = [p for p in args.amortise_over.split(",") if p] if args.amortise_over else None
        total = matched_total(args.match_flops, over)
        tokens = matched_tokens(cfg, total, student_flops_per_token(cfg))
        cfg = load_config(args.config, extra + list(args.overrides) + [f"train.tokens={tokens}"])
        print(f"compute-matched: {tokens:,} tokens, {total:.4g} FLOPs ({'amortised' if over else 'per step'}) "
              f"of {args.match_flops}", flush=True)
    elif args.amortise_over:
        raise ConfigError("--amortise-over: only with --match-flops")
    from cocomix.trainer import train  # lazy: torch after the config is valid

    _no_hf_bars()
    final = train(cfg, method, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"done: {cfg.resolved_run_name} step {final['step']} tokens {final['tokens_seen']:,} "
        f"val/loss {final['val/loss']:.4f} val/ppl {final['val/ppl']:.2f} -> {final['checkpoint']}"
    )
    if args.eval:  # `cocomix eval <run dir>` in the same process: torch and the model code are loaded already
        from evals.run import evaluate  # lazy: lm-eval only for a run that evaluates itself

        results = evaluate(cfg.run_dir, progress=not args.no_progress)
        print(f"done: {len(results)} checkpoint(s) evaluated -> {cfg.run_dir}")
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cocomix.sae import sae_path, train_sae  # lazy: torch after the config is valid

    _no_hf_bars()
    m = train_sae(cfg, progress=not args.no_progress)
    print(f"done: SAE -> {sae_path(cfg)}  fvu {m['fvu']:.4f}  l0 {m['l0']:.2f}  dead {m['dead_fraction']:.3f}  "
          f"loss increase {m['loss_increase']:.4f}"
          + (f"  concept AUROC {m['recovery/best_auroc']:.3f} (random latent {m['recovery/random_auroc']:.3f})"
             if "recovery/best_auroc" in m else ""))
    return 0


def cmd_extract_concepts(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cocomix.concepts import extract_concepts  # lazy: torch after the config is valid

    _no_hf_bars()
    print(extract_concepts(cfg, progress=not args.no_progress))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    load_config(args.config)  # a bad experiment config fails before the plotting stack loads
    from evals.report import report  # lazy: matplotlib and mlflow after the config is valid

    out = report(args.config)
    print(f"tables: {out / 'tables'}  plots: {out / 'plots'}")
    return 0


def cmd_loss_split(args: argparse.Namespace) -> int:
    load_config(args.config)  # a bad experiment config fails before torch loads
    from evals.loss_split import write_loss_split  # lazy: torch after the config is valid

    _no_hf_bars()
    print(write_loss_split(args.config, args.max_blocks))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    extra = []  # shorthands for eval.* overrides
    if args.tasks:
        extra.append(f"eval.tasks=[{args.tasks}]")
    if args.task_data:
        extra.append("eval.task_data=null" if args.task_data == "hub" else f"eval.task_data={args.task_data}")
    if args.limit is not None:
        extra.append(f"eval.limit={args.limit}")
    # `evaluate` resolves the config from the run folder's config.yaml (or --config for a lone
    # checkpoint); what needs neither, the overrides' syntax, is checked first.
    parse_overrides(extra + list(args.overrides))
    from evals.run import evaluate  # lazy: torch and lm-eval after the arguments are valid

    results = evaluate(args.path, extra + list(args.overrides), config_path=args.config, force=args.force,
                       progress=not args.no_progress, device=args.device)
    print(f"done: {len(results)} checkpoint(s) evaluated -> {args.path}")
    return 0


def cmd_track_sync(args: argparse.Namespace) -> int:
    from cocomix.tracking import sync_run  # lazy: the tracking backend only for this command

    for run_dir in args.runs:
        said = sync_run(Path(run_dir), uri=args.uri)
        if said is None:
            return 1  # still unreachable: the warning line said so, the run stays pending
        print(f"{run_dir}: {said}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _load(args, [f"method={_load(args).sweep.method}"])  # its trials' method (method_overrides apply)
    _check_method(cfg)
    from cocomix.sweep import run_worker, sweep  # lazy: optuna after the config is valid

    if args.join:
        run_worker(cfg, args.worker_index)
        return 0
    workers = cfg.sweep.workers if args.workers is None else args.workers
    s = sweep(cfg, args.config, workers)
    best = (f"best trial {s['best_trial']}: held-out loss {s['best_value']:.4f} {s['best_params']}"
            if s.get("best_trial") is not None else "no complete trial yet")
    print(f"sweep {s['study']}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed, "
          f"{s['running']} running, {s['waiting']} queued; {best}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    load_config(args.config)  # a bad experiment config fails before optuna and torch load
    from cocomix.tune import tune  # lazy: optuna after the config is valid

    for method, r in tune(args.config, [args.method] if args.method else None).items():
        best = (f"best trial {r['best_trial']}: tuning loss {r['best_value']:.4f} {r['params']}"
                if r["best_trial"] is not None else "no complete trial")
        at = f" (defaults {r['defaults_value']:.4f})" if r.get("defaults_value") is not None else ""
        print(f"tune {method}: {r['complete']}/{r['trials']} complete; {best}{at}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    cfg = _load(args, [f"method={args.method}"] if args.method else [])
    from cocomix.methods import get_method  # lazy: torch after the config is valid
    from cocomix.params import count_params_for, head_counts, matching_ntp_width  # lazy: torch after the config is valid

    vocab = args.vocab or cfg.model.vocab_size or (50257 if cfg.tokenizer.path else cfg.tokenizer.vocab_size)
    model_config = get_method(cfg.method).model_config(cfg, vocab, 0)
    counts = count_params_for(model_config)
    rows, n_positions = model_config.vocab_size, model_config.n_positions  # rows: padding included
    width = matching_ntp_width(counts.active, cfg.model.n_layer, rows, n_positions)
    line = (f"{cfg.method} d={cfg.model.n_embd} L={cfg.model.n_layer} vocab={vocab} ({rows} rows): total "
            f"{counts.total:,} active {counts.active:,}; the NTP width matching these active parameters: {width}")
    if not head_counts(width):  # no head count gives heads a multiple of 8 wide: the closest width that has one
        fast = matching_ntp_width(counts.active, cfg.model.n_layer, rows, n_positions, multiple_of=8, head_dim_multiple=8)
        heads = min(head_counts(fast), key=lambda h: abs(fast // h - 64))
        line += f" (whose heads cannot be a multiple of 8 wide; the closest that can: {fast}, {heads} heads of {fast // heads})"
    print(line)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Every training run of the experiment with its FLOPs, GPU-hours at a stated MFU and SLURM time
    limit, and the total: what the plan costs before anything is submitted."""
    from cocomix.dag import RUNTIME_MFU, RUNTIME_PEAK_FLOPS, Dag  # lazy: torch after the arguments parse

    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
    dag = Dag(args.config, train_gpus=args.gpus)
    runs = (["teacher"] if dag.teacher is not None else []) + list(dag.runs)
    print(f"{'run':<28} {'tokens':>15} {'FLOPs':>10} {'GPU-h':>9} {'limit (h)':>9} {'GiB/GPU':>8}")
    total = 0.0
    for run in runs:
        cfg = dag.teacher_config() if run == "teacher" else dag.config(run)
        hours = dag.gpu_hours(run, args.mfu)
        total += hours
        print(f"{run:<28} {cfg.train.tokens:>15,} {dag.training_flops(run):>10.3g} {hours:>9,.1f} "
              f"{dag.runtime_minutes(run) / 60:>9.1f} {dag.memory_per_gpu(run) / 2**30:>8.1f}")
    print(f"total: {len(runs)} training runs, {total:,.1f} GPU-hours at {args.mfu:.0%} MFU of "
          f"{RUNTIME_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H100/H200 dense bf16); student training only: label "
          f"extraction, online teachers and evaluation come on top. Time limits: {RUNTIME_MFU:.0%} MFU over "
          f"{args.gpus} GPU(s) a job, doubled, plus 30 min, at most 48 h. GiB/GPU: a lower bound of one training process's "
          "memory (weights, gradients, AdamW state, one micro-batch's activations; no teacher, no allocator slack)")
    return 0


def _parse_concepts(text: str) -> list[int]:
    from cocomix.data import DataError  # lazy: numpy only for `steer`, before torch

    try:
        indices = [int(j) for j in text.split(",") if j.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise DataError(f"--concepts {text!r}: expected comma-separated concept indices, e.g. 17,203")
    return indices


def cmd_inspect(args: argparse.Namespace) -> int:
    parse_overrides(args.overrides)  # the config itself comes from the checkpoint's run folder
    from cocomix.interpret import (  # lazy: torch after the arguments are valid
        describe_concepts, descriptions_path, encode_prompt, inspect_prompt, load_cocomix, write_inspection)

    model, tokenizer, cfg, ckpt = load_cocomix(args.path, args.config, args.overrides)
    descriptions = describe_concepts(cfg)
    result = inspect_prompt(model, tokenizer, encode_prompt(tokenizer, args.prompt), args.top)
    header = [f"CoCoMix concept predictions of {ckpt}", f"prompt: {args.prompt!r} (after an EOS token)",
              f"top {args.top} of {cfg.sae.n_latents} concepts per position: p = softmax of the concept logits z_t",
              f"concept descriptions: {descriptions_path(cfg).with_suffix('.md')}"]
    files = write_inspection(result, descriptions, Path(args.out), header)
    print("\n".join(str(f) for f in files))
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from cocomix.data import DataError  # lazy: numpy only for `steer`, before torch

    if not args.check and args.concepts is None:
        raise DataError("steer needs --concepts (comma-separated concept indices) or --check")
    factors = None if args.check else {j: args.factor for j in _parse_concepts(args.concepts)}
    parse_overrides(args.overrides)  # the config itself comes from the checkpoint's run folder
    from cocomix.interpret import describe_concepts, load_cocomix  # lazy: torch after the arguments are valid
    from cocomix.sae import load_sae  # lazy: torch after the arguments are valid
    from cocomix.steering import steer, steering_check, write_check, write_steering  # lazy: torch after the arguments are valid
    from cocomix.teacher import load_teacher, teacher_dir  # lazy: torch after the arguments are valid

    model, tokenizer, cfg, ckpt = load_cocomix(args.path, args.config, args.overrides)
    descriptions = describe_concepts(cfg)
    teacher, sae = load_teacher(cfg), load_sae(cfg)
    out = Path(args.out)
    if args.check:  # sampled, many samples: a frequency needs them
        result = steering_check(cfg, model, tokenizer, teacher, sae, descriptions, args.ground_truth, args.factor,
                                args.samples or 64, args.max_new_tokens, args.seed,
                                1.0 if args.temperature is None else args.temperature, args.prompt)
        files = write_check(result, out)
        print(files[0].read_text(), end="")
    else:  # greedy, one sample unless asked otherwise
        result = steer(model, tokenizer, teacher, sae, cfg.sae.layer, args.prompt, factors, args.samples or 1,
                       args.max_new_tokens, args.seed, args.temperature or 0.0)
        files = write_steering(result, descriptions, out, [f"steering {ckpt} and its teacher {teacher_dir(cfg)}"])
    print("\n".join(str(f) for f in files))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cocomix.export import export  # lazy: torch after the arguments are parsed

    _no_hf_bars()
    out = export(args.path, args.out)
    print(f"exported -> {out}")
    return 0


def _add_setup_parsers(sub) -> None:
    """`config` and `prepare-data`."""
    p = sub.add_parser("config", help="print the resolved config as YAML, each key with its docstring")
    _add_config_args(p)
    p.add_argument("--slot-ratio", action="store_true",
                   help="also print the concept slot's norm relative to its token's at init (a YAML comment)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare-data", help="corpus -> tokenizer -> token shards + manifest")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching manifest exists")
    p.set_defaults(func=cmd_prepare_data)


def _add_training_parsers(sub) -> None:
    """`train`, `train-sae` and `extract-concepts`."""
    p = sub.add_parser("train", help="train one (method, scale, seed) run; resumes automatically")
    _add_config_args(p)
    p.add_argument("--method", default=None, help="shorthand for method=...")
    p.add_argument("--seed", type=int, default=None, help="shorthand for seed=...")
    p.add_argument("--eval", action="store_true",
                   help="then evaluate every checkpoint of the run, as `cocomix eval <run dir>` (one process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tuned", default=None, metavar="BEST_JSON",
                   help="train with a tuning study's values (<experiment>/tuning/<method>/best.json, `cocomix tune`); "
                        "the overrides given here win over them")
    p.add_argument("--match-flops", default=None, metavar="FINAL_METRICS",
                   help="set train.tokens so this run spends the FLOPs of that finished run (compute-matched arm)")
    p.add_argument("--amortise-over", default=None, metavar="FILES",
                   help="with --match-flops: comma-separated final_metrics.json of every run sharing the one-off "
                        "items (teacher, SAE, labels); match the amortised total instead of the per-step one")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-sae", help="train the TopK SAE on the teacher's residual stream -> <experiment>/sae/")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser("extract-concepts", help="attribution concept labels for every block -> label cache (resumable)")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract_concepts)


def _add_results_parsers(sub) -> None:
    """`report`, `eval` and `track-sync`."""
    p = sub.add_parser("report", help="main, sample-efficiency and ablation tables + plots for an experiment")
    p.add_argument("--config", "-c", required=True, help="the experiment config the DAG ran")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("loss-split", help="where each run's held-out loss gap to NTP lives, by target token "
                                          "(bigram-easy/hard; topic/profession/function words on the synthetic corpus)")
    p.add_argument("--config", "-c", required=True, help="the experiment config the DAG ran")
    p.add_argument("--max-blocks", type=int, default=None, help="validation blocks to use (default: all)")
    p.set_defaults(func=cmd_loss_split)

    p = sub.add_parser("eval", help="held-out perplexity + lm-eval tasks for a checkpoint or every checkpoint of a run")
    p.add_argument("path", help="a run folder (every checkpoint, each once) or one checkpoint folder")
    _add_config_args(p)  # --config only matters for a checkpoint outside a run folder
    p.add_argument("--tasks", default=None, help="comma-separated tasks or aliases (paper, synthetic); eval.tasks")
    p.add_argument("--task-data", default=None, help="folder of local benchmark copies, or 'hub'; eval.task_data")
    p.add_argument("--limit", type=int, default=None, help="documents per task (smoke runs); eval.limit")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="re-evaluate checkpoints that already have eval.json")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("track-sync", help="send what MLflow lacks of runs that trained without it (metrics.jsonl, "
                                          "eval.json), without duplicates; W&B runs: the `wandb sync` command")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--uri", default=None, help="tracking URI (default: the one the run could not reach)")
    p.set_defaults(func=cmd_track_sync)


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="Optuna sweep of concept.insert_layer, concept.k (and sweep.space) -> "
                                     "<experiment>/sweeps/<study>/")
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default sweep.workers; "
                                                             "0: create the study and write outputs only)")
    p.add_argument("--join", action="store_true", help="be one worker of an existing study (cluster jobs)")
    p.add_argument("--worker-index", type=int, default=int(os.environ.get("SLURM_PROCID", "0")),
                   help="offsets the sampler seed (default $SLURM_PROCID or 0)")
    p.set_defaults(func=cmd_sweep)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="equal tuning: one Optuna study per method of dag.methods on the tuning split "
                                    "-> <experiment>/tuning/<method>/best.json")
    p.add_argument("--config", "-c", required=True, help="the experiment config")
    p.add_argument("--method", default=None, help="tune this method only (default: every method of dag.methods)")
    p.set_defaults(func=cmd_tune)


def _add_params_parser(sub) -> None:
    p = sub.add_parser("params", help="total and active parameters (spec 1.7) and the matching NTP width")
    _add_config_args(p)
    p.add_argument("--method", default=None, help="shorthand for method=...")
    p.add_argument("--vocab", type=int, default=None, help="default: model.vocab_size, 50257 with tokenizer.path, "
                                                           "else tokenizer.vocab_size")
    p.set_defaults(func=cmd_params)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="every training run's FLOPs, GPU-hours at an MFU and SLURM time limit, and the total")
    p.add_argument("--config", required=True, help="the experiment config, e.g. config/paper.yaml")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to price GPU-hours at (default 0.4)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs a training job gets, for its time limit (default 8)")
    p.set_defaults(func=cmd_plan)


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="top predicted concepts per position of a prompt -> text, JSON and heat-map PNG")
    p.add_argument("path", help="a CoCoMix checkpoint folder, or a run folder (its latest checkpoint)")
    _add_config_args(p)  # --config only matters for a checkpoint outside a run folder
    p.add_argument("--prompt", required=True, help="text to inspect (read after an EOS token, as a document start)")
    p.add_argument("--out", required=True, help="folder for inspect.txt, inspect.json, inspect.png")
    p.add_argument("--top", type=int, default=5, help="concepts shown per position")
    p.set_defaults(func=cmd_inspect)


def _add_steer_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with chosen concepts' logits x factor, beside unsteered; "
                                     "the same on the teacher through its SAE")
    p.add_argument("path", help="a CoCoMix checkpoint folder, or a run folder (its latest checkpoint)")
    _add_config_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: a document start)")
    p.add_argument("--concepts", default=None, help="comma-separated concept (SAE latent) indices to steer")
    p.add_argument("--factor", type=float, default=10.0, help="multiplier of the chosen logits (paper: -10 .. 10)")
    p.add_argument("--out", required=True, help="folder for steer.txt, steer.json, steer.png (or steer_check.json)")
    p.add_argument("--samples", type=int, default=None, help="continuations per run, the same seed steered and not "
                                                             "(default 1; with --check 64)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="0: greedy; else sampling "
                                                                   "(default: greedy; with --check: 1)")
    p.add_argument("--check", action="store_true", help="synthetic corpus: steer the latent best matching a "
                                                       "ground-truth concept and count that concept's words")
    p.add_argument("--ground-truth", default=None, help="--check: the concept name, e.g. topic_3 (default: best matched)")
    p.set_defaults(func=cmd_steer)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint as a Hugging Face Hub folder: weights, remote code, tokenizer, "
                                      "model card with its evaluation (no trainer state)")
    p.add_argument("path", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out", help="the folder to create (must not exist, or be empty)")
    p.set_defaults(func=cmd_export)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("cocomix")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocomix", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cocomix {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_setup_parsers(sub)  # in `cocomix --help` order
    _add_training_parsers(sub)
    _add_results_parsers(sub)
    _add_sweep_parser(sub)
    _add_tune_parser(sub)
    _add_params_parser(sub)
    _add_plan_parser(sub)
    _add_inspect_parser(sub)
    _add_steer_parser(sub)
    _add_export_parser(sub)
    return parser


# The errors that end in one `cocomix: error:` line, by the module that defines each
# (tests/test_cli.py checks every entry resolves).
USER_ERRORS = (("cocomix.config", "ConfigError"), ("cocomix.data.errors", "DataError"),
               ("cocomix.callbacks", "TrainingError"), ("cocomix.sweep", "SweepError"),
               ("cocomix.tracking", "TrackingError"), ("cocomix.records", "RecordError"),
               ("cocomix.checkpoints", "CheckpointError"), ("cocomix.files", "FileFormatError"),
               ("cocomix.files", "StorageError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS' classes among the modules loaded so far. An error can only have been raised by a
    module that was imported, so this imports nothing: torch stays unloaded until a command needs it."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type))


# Subcommands that run on a GPU when there is one: each claims one device (cocomix/gpus.py) before
# torch starts, so concurrent DAG jobs never share a GPU. `sweep` claims in its workers (--join).
GPU_COMMANDS = ("train", "train-sae", "extract-concepts", "eval", "inspect", "steer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus dotted overrides anywhere on the line (`eval RUN --no-progress eval.limit=8`):
    argparse alone stops collecting positionals at the first option."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in GPU_COMMANDS or (args.command == "sweep" and args.join):
        claim_for_process()
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            from cocomix.files import write_failure  # lazy: only an error that is not a user error needs it

            # The filesystem refused a write (full, quota, size limit, read-only, permission): one line.
            # Every write is atomic, so what was written before is complete.
            e = write_failure(e, getattr(e, "filename", None) or "a file", "what was written before it is complete")
            if e is None:
                raise
        print(f"cocomix: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt as e:  # SIGINT, or a stop signal during training (cocomix.callbacks.Terminated)
        print(getattr(e, "message", "cocomix: interrupted"), file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
