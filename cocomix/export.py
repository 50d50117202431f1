"""`cocomix export <run or checkpoint> <out>`: a trained checkpoint as a folder ready for the Hugging
Face Hub (`hf upload <repo> <out>`), loadable without this package.

    <out>/
      model.safetensors            the weights
      config.json                  with `auto_map`, so AutoModelForCausalLM finds the classes below
      generation_config.json
      model.py, slots.py           the model's code (remote code: `trust_remote_code=True`)
      tokenizer.json, tokenizer_config.json   model_max_length = the model's context (n_positions)
      README.md                    the model card: method (and ablation), data, tokens trained,
                                   parameters, geometry, the evaluation numbers of the checkpoint's
                                   eval.json with their standard errors, and the `lm_eval` command
                                   that reproduces them
      eval_tasks/                  only when that evaluation read local task files (the synthetic
                                   tasks, offline copies of the paper's benchmarks): their task YAMLs
                                   and data, with paths relative to <out>, for that command

No trainer state (trainer/, trainer_state.pt, optimizer.pt) and no run records (checkpoint.json,
eval.json, lm_eval_results.json) are copied. A run folder exports its newest checkpoint. The folder
is written under a temporary name beside <out> and renamed into place when complete (a reader never
sees half of it); its files get the modes a plain `open` gives (0644 under umask 022). An existing
non-empty <out> is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from cocomix.checkpoints import TRAINER_DIR, TRAINER_FILES, find_checkpoints, read_meta, model_damage
from cocomix.data.errors import DataError
from cocomix.data.tokenizer import set_model_max_length
from cocomix.config import ConfigError, read_yaml
from cocomix.files import follow_umask, read_json, read_sealed_json, sha256_file, sha256_text
from cocomix.methods import Method, get_method
from cocomix.model import CocomixForCausalLM
from cocomix.params import count_params
from evals.harness import expand_tasks
from evals.offline_tasks import OFFLINE_SUFFIX, PAPER_TASKS
from evals.run import load_eval_config
from evals.synthetic_tasks import SYNTHETIC_TASKS

README = "README.md"
TASKS_DIR = "eval_tasks"
# What a tokenizer folder may hold (copied as they are; model_max_length is then set to the context).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


class ExportError(DataError):
    """A checkpoint that cannot be exported, or an output folder that is in the way (one line)."""


# --------------------------------------------------------------------------------------
# Finding what to export
# --------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> tuple[Path | None, Path]:
    """(run folder or None, the checkpoint to export): a checkpoint folder itself, or a run folder's
    newest complete checkpoint (its final one once training finished)."""
    run_dir, checkpoints = find_checkpoints(path)  # the same reading of a path as `cocomix eval`
    return run_dir, checkpoints[-1]


def _run_config(run_dir: Path | None):
    """The run's resolved config (config.yaml), or None for a checkpoint outside a run folder."""
    if run_dir is None:
        return None
    return load_eval_config(run_dir, None, [])


def _eval_record(ckpt: Path) -> tuple[dict | None, dict | None]:
    """(eval.json, lm_eval_results.json beside it) of a checkpoint, else its newest evaluation beside it
    (`--limit`, other tasks: evals/run.py `results_name`); (None, None) when not evaluated."""
    path = ckpt / "eval.json"
    if not path.is_file():
        beside = sorted(ckpt.glob("eval-*.json"), key=lambda p: p.stat().st_mtime)
        if not beside:
            return None, None
        path = beside[-1]
    record = read_sealed_json(path)
    if record is None:
        raise ExportError(f"{path} is damaged (not the record `cocomix eval` wrote); run `cocomix eval --force "
                          f"{ckpt}` again before exporting")
    raw = None
    ref = record.get("lm_eval_results")
    if ref:
        lm_file = ckpt / ref["file"]
        text = lm_file.read_text(encoding="utf-8") if lm_file.is_file() else None
        if text is None or sha256_text(text) != ref["sha256"]:
            raise ExportError(f"{lm_file} is missing or not the one {path} was written with; run `cocomix eval "
                              f"--force {ckpt}` again before exporting")
        raw = json.loads(text)
    return record, raw


# --------------------------------------------------------------------------------------
# The evaluation: task files and the lm_eval command
# --------------------------------------------------------------------------------------


def _localize_data_files(tree: Any, task: str, out: Path) -> Any:
    """Copy every file a task config's `data_files` names into `<out>/eval_tasks/<task>/` and point
    the config at the copies, relative to <out> (lm-eval resolves relative data files against the
    working directory: the command runs from <out>)."""
    if isinstance(tree, list):
        return [_localize_data_files(t, task, out) for t in tree]
    if not isinstance(tree, dict):
        return tree
    new = {}
    for key, value in tree.items():
        if key == "data_files" and isinstance(value, dict):
            files = {}
            for split, source in value.items():
                source = Path(source)
                if not source.is_file():
                    raise ExportError(f"task {task}: its data file {source} is gone; run `cocomix eval --force` "
                                      "again before exporting")
                rel = Path(TASKS_DIR) / task / f"{split}{source.suffix}"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, out / rel)
                files[split] = rel.as_posix()
            new[key] = files
        else:
            new[key] = _localize_data_files(value, task, out)
    return new


def export_tasks(record: dict, raw: dict, out: Path) -> tuple[list[str], bool]:
    """Write the local task YAMLs and data the evaluation read into <out>/eval_tasks/; return the
    task names for `lm_eval --tasks` and whether `--include_path eval_tasks` is needed."""
    settings = record["settings"]
    names, local = [], False
    for task in expand_tasks(settings["tasks"]):
        config = (raw.get("configs") or {}).get(task)
        if task in SYNTHETIC_TASKS:  # our YAML beside its data (evals/synthetic_tasks.py)
            source = Path((config or {}).get("metadata", {}).get("config_source", ""))
            yaml_name = f"{task}.yaml"
        elif task in PAPER_TASKS and settings.get("task_data"):  # a one-member group (evals/offline_tasks.py)
            data_files = (config or {}).get("dataset_kwargs", {}).get("data_files") or {}
            source = Path(next(iter(data_files.values()), "")).parent.parent / f"{task}{OFFLINE_SUFFIX}.yaml"
            yaml_name = f"{task}{OFFLINE_SUFFIX}.yaml"
        else:  # lm-eval's own task, from the Hub
            names.append(task)
            continue
        if config is None or not source.is_file():
            raise ExportError(f"task {task}: its task file is not where the evaluation left it ({source}); run "
                              "`cocomix eval --force` again before exporting")
        tree = _localize_data_files(read_yaml(source), task, out)
        (out / TASKS_DIR).mkdir(exist_ok=True)
        (out / TASKS_DIR / yaml_name).write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        names.append(Path(yaml_name).stem)
        local = True
    return names, local


def lm_eval_command(record: dict, raw: dict, cfg, n_positions: int, tasks: list[str], include: bool) -> str:
    """The `lm_eval` command line that recomputes the checkpoint's task numbers from the exported
    folder (run from inside it): the settings `cocomix eval` used (evals/run.py, evals/harness.py):
    zero-shot, its document limit and seeds, batch size, fp32 weights, the model's context as
    max_length, the device and, on CUDA, the same bf16 autocast. (The CLI has no flag for the
    bootstrap iterations: bootstrapped standard errors differ, see `_eval_lines`.)"""
    run = raw.get("config") or {}
    model_args = ["pretrained=.", "trust_remote_code=True", "dtype=float32", f"max_length={n_positions}",
                  "backend=causal"]
    device = record.get("device") or "cpu"
    if cfg is not None and device.startswith("cuda") and cfg.train.precision in ("auto", "bf16"):
        model_args.append("mixed_precision_dtype=bfloat16")
    # eval.json records the batch size; records written before it did take the run's config's.
    batch_size = (record.get("harness_batch_size") or record["settings"].get("harness_batch_size")
                  or (cfg.eval.harness_batch_size if cfg is not None else 64))
    seeds = ",".join(str(run.get(k, d)) for k, d in
                     (("random_seed", 0), ("numpy_seed", 1234), ("torch_seed", 1234), ("fewshot_seed", 1234)))
    parts = ["lm_eval --model hf", f"--model_args {','.join(model_args)}", f"--tasks {','.join(tasks)}"]
    if include:
        parts.append(f"--include_path {TASKS_DIR}")
    limit = record["settings"].get("limit")
    parts.append(f"--num_fewshot {record['settings'].get('num_fewshot', 0)}"
                 + (f" --limit {limit}" if limit is not None else "")
                 + f" --batch_size {batch_size}")
    parts.append(f"--seed {seeds} --device {device} --output_path lm_eval_out")
    return " \\\n  ".join(parts)


# --------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def _value(metrics: dict, key: str) -> str:
    se = metrics.get(f"{key}_stderr")
    return _num(metrics[key]) + (f" ± {_num(se)}" if isinstance(se, (int, float)) else "")


PAPER_URL = "https://arxiv.org/abs/2502.08524"
OFFICIAL_CODE_URL = "https://github.com/facebookresearch/RAM/tree/main/projects/cocomix"
# lm-eval metric names -> the Hub's metric types (model-index; the Hub shows them as evaluation results)
HUB_METRIC = {"acc": "accuracy", "acc_norm": "accuracy", "perplexity": "perplexity",
              "word_perplexity": "perplexity", "byte_perplexity": "perplexity", "bits_per_byte": "bits_per_byte"}


def model_index(name: str, record: dict | None) -> list[dict] | None:
    """The card's `model-index` (the Hub's evaluation results) from the checkpoint's eval.json: one result
    per task and metric, and the held-out perplexity of the training corpus; None when not evaluated."""
    if record is None:
        return None
    metrics, results = record["metrics"], []
    for task in expand_tasks(record["settings"]["tasks"]):
        for key, value in metrics.items():
            if not key.startswith(f"{task}/") or key.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metric = key.split("/", 1)[1]
            results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                            "dataset": {"name": task, "type": task},
                            "metrics": [{"type": HUB_METRIC.get(metric, metric), "value": round(float(value), 6),
                                         "name": metric, "verified": False}]})
    if isinstance(metrics.get("val_ppl"), (int, float)):
        results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                        "dataset": {"name": "held-out split of the training corpus", "type": "heldout"},
                        "metrics": [{"type": "perplexity", "value": round(float(metrics["val_ppl"]), 6),
                                     "name": "held-out perplexity", "verified": False}]})
    return [{"name": name, "results": results}] if results else None


def _front_matter(cfg, tree: dict, method: str, ablation: str | None, name: str, record: dict | None) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "license": tree.get("license") or "mit"}  # a run trained before `license` existed: MIT
    tags = ["cocomix", method, "causal-lm", "custom_code"] + ([f"ablation-{ablation}"] if ablation else [])
    meta["tags"] = list(dict.fromkeys(tags))
    if cfg is not None and cfg.data.source == "hf" and cfg.data.hf_path:
        meta["datasets"] = [cfg.data.hf_path]
    index = model_index(name, record)
    if index:
        meta["model-index"] = index
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _data_lines(cfg) -> list[str]:
    if cfg is None:
        return ["- not recorded (the checkpoint was exported outside its run folder, which holds config.yaml)"]
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        source = (f"the synthetic concept-driven corpus of `cocomix.data.synthetic` ({s.n_tokens:,} words, "
                  f"{s.n_topics} latent topics, {s.n_professions} professions, generator seed {s.seed})")
    elif d.source == "hf":
        source = (f"the Hugging Face dataset `{d.hf_path}`" + (f" (config `{d.hf_name}`)" if d.hf_name else "")
                  + f", split `{d.hf_split}`, field `{d.text_field}`")
    else:
        source = "local text files: " + ", ".join(f"`{Path(p).name}`" for p in d.paths)
    tok = cfg.tokenizer
    tokenizer = (f"the tokenizer of `{Path(tok.path).name}`" if tok.path
                 else f"a byte-level BPE trained on the corpus ({tok.vocab_size:,} tokens)")
    return [f"- corpus: {source}", f"- held-out split: {d.val_fraction:.0%} of the documents (split seed "
            f"{d.split_seed})", f"- tokenizer: {tokenizer}"]


def describe(method: str) -> str:
    """The method's own description (its class's `description`), or a pointer to the harness."""
    try:
        return get_method(method).description
    except ConfigError:  # a method this installation does not have
        return Method.description


def _method_lines(cfg, config: dict, method: str, ablation: str | None) -> list[str]:
    lines = [f"- method: `{method}`: {describe(method)}"]
    if ablation:
        changes = (cfg.dag.ablations.get(ablation) if cfg is not None else None) or {}
        detail = ", ".join(f"`{k}={v}`" for k, v in changes.items())
        lines.append(f"- ablation: `{ablation}`" + (f" ({detail})" if detail else ""))
    if config.get("slot") == "concept" and cfg is not None:
        c = cfg.concept
        lines.append(f"- concepts: a {cfg.sae.n_latents:,}-latent TopK SAE (k={cfg.sae.k}) on block {cfg.sae.layer} of "
                     f"the teacher; labels: top {c.k_attr} by `{c.scoring}`; TopK {c.k} mixed by `{c.mix}`; "
                     f"concept-loss weight {c.lam}")
    if cfg is not None:
        t = cfg.train
        lines.append(f"- optimisation: AdamW, peak lr {t.lr:g}, cosine to {t.min_lr_ratio:g}x, weight decay "
                     f"{t.weight_decay:g}, global batch {t.global_batch_size} x {t.block_size} tokens, seed {cfg.seed}")
    return lines


def model_card(*, name: str, ckpt: Path, meta: dict, config: dict, cfg, tree: dict, counts: dict,
               record: dict | None, command: str | None, weights_sha256: str) -> str:
    method = meta.get("method") or config.get("method") or "unknown"
    ablation = (cfg.tracking.tags.get("ablation") if cfg is not None else None) or None
    ablation = None if ablation == "none" else ablation
    lines = [_front_matter(cfg, tree, method, ablation, name, record), f"# {name}", ""]
    lines += [f"A {counts['total']:,}-parameter causal language model trained with `{method}`"
              + (f" (ablation `{ablation}`)" if ablation else "") + " by the cocomix harness, a reproduction "
              f"of [*LLM Pretraining with Continuous Concepts*]({PAPER_URL}) (Tack et al., 2025; "
              f"[official code]({OFFICIAL_CODE_URL})). "
              f"Checkpoint `{ckpt.name}`: step {meta['step']:,}, {meta['tokens_seen']:,} training tokens.", ""]
    lines += ["## Method", "", *_method_lines(cfg, config, method, ablation), ""]
    lines += ["## Training data", "", *_data_lines(cfg), f"- tokens trained: {meta['tokens_seen']:,} "
              f"({meta['step']:,} optimizer steps)", ""]
    slot = config.get("slot")
    geometry = [
        ("parameters", f"{counts['total']:,} total, {counts['non_embedding']:,} without the embeddings"
         + (f", {counts['active']:,} active per token" if counts["active"] != counts["total"] else "")),
        ("blocks", f"{config['n_layer']} (pre-LN GPT-2 blocks, tanh-GELU MLP, LM head tied to the embedding)"),
        ("width", f"{config['n_embd']}, {config['n_head']} heads of {config['n_embd'] // config['n_head']}"),
        ("context", f"{config['n_positions']} tokens (learned absolute positions)"),
        ("vocabulary", f"{config['real_vocab_size']:,} tokens" + (
            f" (embedding padded to {config['vocab_size']:,} rows; padding ids get -inf logits)"
            if config["vocab_size"] != config["real_vocab_size"] else "")),
    ]
    if slot is not None:
        options = ", ".join(f"{k}={v}" for k, v in (config.get("slot_options") or {}).items())
        geometry.append(("slot", f"`{slot}` after block {config['insert_layer']} ({options})"))
    lines += ["## Model", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in geometry), "",
              "Load it without the cocomix package:", "", "```python",
              "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
              'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)',
              'tokenizer = PreTrainedTokenizerFast.from_pretrained("<this folder or repo>")', "```", "",
              "The tokenizer is a standard one (tokenizer.json): no custom code runs for it. `AutoTokenizer` works "
              "too, but transformers 5 reads config.json first and so asks whether to run the model's code (pass "
              "`trust_remote_code=True`, or `False` to load the tokenizer alone without asking).", "",
              "`attn_implementation` may be `\"sdpa\"` (default) or `\"eager\"` (which can return attention maps); "
              "`gradient_checkpointing_enable()` works for fine-tuning.", ""]
    lines += ["## Evaluation", ""]
    if record is None:
        lines += ["Not evaluated: run `cocomix eval` on the checkpoint before exporting to include its numbers.", ""]
    else:
        lines += _eval_lines(record, command)
    lines += ["## Files", "", f"- `model.safetensors` sha256 `{weights_sha256}`"
              + (" (the training checkpoint's, as checkpoint.json records it)"
                 if meta.get("files", {}).get("model.safetensors", {}).get("sha256") == weights_sha256 else ""),
              "- no optimizer or trainer state: this folder is for inference and fine-tuning", ""]
    return "\n".join(lines)


def _eval_lines(record: dict, command: str | None) -> list[str]:
    metrics, settings = record["metrics"], record["settings"]
    bootstrapped = set(record.get("cocomix_stderrs") or [])
    rows = []
    for task in expand_tasks(settings["tasks"]):
        for key in metrics:
            if key.startswith(f"{task}/") and not key.endswith("_stderr"):
                mark = " †" if f"{key}_stderr" in bootstrapped else ""
                docs = (record.get("n_docs") or {}).get(task, {}).get("effective", "")
                rows.append(f"| {task} | {key.split('/', 1)[1]} | {_value(metrics, key)}{mark} | {docs} |")
    lines = [f"`cocomix eval` of this checkpoint (lm-eval {record.get('versions', {}).get('lm_eval', '?')}, "
             f"{settings.get('num_fewshot', 0)}-shot"
             + (f", the first {settings['limit']} documents of each task" if settings.get("limit") is not None else "")
             + f", on {record.get('device', '?')}). Value ± standard error (lm-eval's: binomial for accuracies, "
             "bootstrap for perplexities).", ""]
    if rows:
        lines += ["| task | metric | value | documents |", "|---|---|---|---|", *rows, ""]
        if bootstrapped:
            lines += ["† standard error bootstrapped over documents by cocomix (lm-eval reports none for "
                      "weighted perplexities).", ""]
    held_out = [(k, label) for k, label in (("val_loss", "loss (nats/token)"), ("val_ppl", "perplexity"))
                if k in metrics]
    if held_out:
        blocks = metrics.get("val_blocks")
        lines += ["Held-out split of the training corpus (cocomix's perplexity protocol"
                  + (f", {int(blocks)} blocks of {settings.get('ppl_block_size')} tokens" if blocks else "")
                  + "; not an lm-eval task): " + ", ".join(f"{label} {_value(metrics, k)}" for k, label in held_out)
                  + ".", ""]
    for key, label in (("avg_acc", "average accuracy (the paper's five tasks)"),
                       ("avg_ppl", "average perplexity (held-out, LAMBADA, WikiText)")):
        if key in metrics:
            lines += [f"{label}: {_num(metrics[key])}", ""]
    if command:
        lines += ["Reproduce the task numbers with lm-evaluation-harness, from inside this folder (task files "
                  f"under `{TASKS_DIR}/` are read relative to it):", "", "```bash", command, "```", ""]
        boot = sorted({k.split("/", 1)[1].removesuffix("_stderr") for k in metrics if k.endswith("_stderr")}
                      - {"acc", "acc_norm"})
        if boot:
            lines += [f"The values are reproduced exactly; the standard errors of {', '.join(boot)} are "
                      "bootstrapped, and the lm_eval CLI resamples 100,000 times where cocomix resampled 1,000 "
                      "(no CLI flag sets it), so those differ in their last digits.", ""]
        if record.get("clipped_continuations"):
            lines += [f"Note: {record['clipped_continuations']} continuation(s) were longer than the context; "
                      "cocomix scored them on their last tokens, where lm-eval's `hf` model stops with an "
                      "assertion, so those tasks need a longer context to run this way.", ""]
    return lines


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def ship_concepts(cfg, config: dict, tmp: Path) -> str | None:
    """A CoCoMix model's concept ids index the latents of its SAE: ship the SAE in SAELens's format
    (`sae/`, cocomix/saelens.py) and every latent's description (`sae/descriptions.json` and `.md`,
    cocomix/interpret.py), so a reader can tell what concept i is. Returns the card's line, or None
    for a model without concepts (or a run whose config is not there)."""
    if config.get("slot") != "concept" or cfg is None:
        return None
    from cocomix.interpret import describe_concepts, descriptions_markdown  # lazy: teacher and data scan
    from cocomix.sae import load_sae  # lazy: as above
    from cocomix.saelens import export_saelens  # lazy: as above

    layer = cfg.sae.layer
    export_saelens(load_sae(cfg), tmp / "sae", hook_name=f"blocks.{layer}.hook_resid_post",
                   model_name=str(cfg.teacher.path) if cfg.teacher.path else "teacher", context_size=cfg.train.block_size)
    desc = describe_concepts(cfg)
    (tmp / "sae" / "descriptions.json").write_text(json.dumps(desc, indent=1), encoding="utf-8")
    (tmp / "sae" / "descriptions.md").write_text(descriptions_markdown(desc), encoding="utf-8")
    return (f"- `sae/`: the TopK SAE whose {cfg.sae.n_latents:,} latents the concept ids index (SAELens format: "
            f"`sae_lens.SAE.load_from_disk(\"sae\")`; the teacher's residual stream after block {layer}), with "
            "`descriptions.json` / `.md`: what each concept is (its top activating contexts and promoted tokens)")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; refusing to overwrite it (choose a new folder or "
                          "remove it first)")


def export(source: str | Path, out: str | Path) -> Path:
    """Export the checkpoint `source` names (a checkpoint folder, or a run folder: its newest) to the
    new folder `out`; returns `out`."""
    out = Path(out)
    _check_out(out)  # before any work
    run_dir, ckpt = resolve_checkpoint(source)
    problem = model_damage(ckpt)
    if problem:
        raise ExportError(f"checkpoint {ckpt} is damaged: {problem}; it cannot be exported")
    meta = read_meta(ckpt)
    record, raw = _eval_record(ckpt)
    cfg = _run_config(run_dir)
    tree = (read_yaml(run_dir / "config.yaml") or {}) if run_dir is not None else {}
    name = f"{run_dir.name}-{ckpt.name}" if run_dir is not None else ckpt.name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model = CocomixForCausalLM.from_pretrained(ckpt)  # the weights as saved (their dtype)
        model.save_pretrained(tmp)  # weights, config.json with auto_map, model.py + slots.py (this package's)
        for file in TOKENIZER_FILES:
            if (ckpt / file).is_file():
                shutil.copyfile(ckpt / file, tmp / file)
        if not (tmp / "tokenizer.json").is_file() and not (tmp / "vocab.json").is_file():
            raise ExportError(f"checkpoint {ckpt}: has no tokenizer files")
        n_positions = model.config.n_positions
        set_model_max_length(tmp, n_positions)
        command = None
        if record is not None and raw is not None and record["settings"].get("tasks"):
            tasks, include = export_tasks(record, raw, tmp)
            command = lm_eval_command(record, raw, cfg, n_positions, tasks, include) if tasks else None
        shipped = ship_concepts(cfg, read_json(tmp / "config.json"), tmp)
        counts = count_params(model)
        card = model_card(
            name=name, ckpt=ckpt, meta=meta,
            config=read_json(tmp / "config.json"), cfg=cfg, tree=tree,
            counts={"total": counts.total, "active": counts.active,
                    "non_embedding": model.num_params(non_embedding=True)},
            record=record, command=command, weights_sha256=sha256_file(tmp / "model.safetensors"))
        if shipped:
            card = card.replace("## Files\n\n", "## Files\n\n" + shipped + "\n", 1)
        del model
        (tmp / README).write_text(card, encoding="utf-8")
        left = [p for p in tmp.rglob("*") if p.name in TRAINER_FILES or p.name == TRAINER_DIR]
        if left:  # never ship what only resuming reads
            raise ExportError(f"export of {ckpt}: trainer state in the output ({left[0].name})")
        follow_umask(tmp)  # safetensors writes 0600: 0644 under umask 022, like every other file
        try:
            os.replace(tmp, out)  # onto nothing, or onto an empty folder
        except OSError as e:  # e.g. something was written into <out> meanwhile
            raise ExportError(f"{out}: cannot move the export into place ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind (gone once renamed)
        raise
    return out
