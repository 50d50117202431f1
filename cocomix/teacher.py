"""The frozen teacher: load it, fingerprint it, and read (or edit) its residual stream.

The teacher is the LM whose SAE concepts supervise CoCoMix (spec 1.1: GPT-2 124M in the paper;
in the tiny profile one of our own NTP checkpoints). `cfg.teacher.path` is either

* one of our checkpoints (`config.json` with `model_type: "cocomix"`), or
* a transformers GPT-2 folder (`model_type: "gpt2"`), imported with `CocomixForCausalLM.from_gpt2`, or
* any other transformers causal LM (GPT-NeoX/Pythia, Llama, Qwen, ...), seen through our interface
  (`HFTeacher`, cocomix/hf_teacher.py); its decoder layer `layer`'s output is the residual stream.

The residual stream "after block `layer`" (GPT-2 `blocks.{layer}.hook_resid_post`) is the output
of `transformer.h[layer]`; `run_teacher` exposes it through a forward hook so the model's own
forward stays the single source of truth.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

import torch

from cocomix.config import Config, ConfigError
from cocomix.data import DataError
from cocomix.data.shards import check_tokenizer_matches, load_manifest
from cocomix.checkpoints import find_checkpoints, is_checkpoint, list_checkpoints, read_meta
from cocomix.files import read_json, update_sha256
from cocomix.hf_teacher import layer_output, load_hf_teacher, with_layer_output
from cocomix.model import CocomixConfig, CocomixForCausalLM

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: a Hub model id, when no such folder exists
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # one row per token id (plus padding rows)


def teacher_dir(cfg: Config) -> Path:
    """`teacher.path`: a checkpoint or GPT-2 folder, or a run folder (its latest checkpoint). Unset,
    the teacher is the experiment's own NTP run named 'teacher' (trained first by the DAG)."""
    path = Path(cfg.teacher.path) if cfg.teacher.path else cfg.experiment_dir / "runs" / "teacher"
    if cfg.teacher.path and not path.exists() and HUB_ID.fullmatch(cfg.teacher.path):
        path = hub_snapshot(cfg.teacher.path)
    if not path.exists() and not cfg.teacher.path:
        raise ConfigError(f"config key 'teacher.path': not set and no teacher run at {path} "
                          "(expected a checkpoint folder or a GPT-2 folder)")
    if not (path / "config.json").is_file() and list_checkpoints(path):
        path = _run_checkpoint(path, cfg.teacher.checkpoint_tokens)
    if not (path / "config.json").is_file():
        raise DataError(f"teacher {path}: not a model folder (no config.json); set teacher.path to a checkpoint")
    return path


def hub_snapshot(repo_id: str) -> Path:
    """A Hub model id as `teacher.path`: its local snapshot (downloaded when online). Offline (every DAG
    job, HF_HUB_OFFLINE=1) and not in the cache: one line saying how to download it once."""
    from huggingface_hub import snapshot_download  # lazy: only for a Hub id
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except (LocalEntryNotFoundError, OSError) as e:
        how = (f"download it once where the Hub is reachable: `HF_HUB_OFFLINE=0 hf download {repo_id} --local-dir "
               f"models/{repo_id.split('/')[-1]}`, then set teacher.path to that folder")
        why = "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache" if offline else str(e).splitlines()[0]
        raise ConfigError(f"config key 'teacher.path': {repo_id!r} is not a folder, and as a Hub id it is {why}; "
                          f"{how}") from None


def _run_checkpoint(run_dir: Path, tokens: int | None) -> Path:
    """The run's latest checkpoint, or the one written at `tokens` (teacher.checkpoint_tokens)."""
    ckpts = list_checkpoints(run_dir)
    if tokens is None:
        return ckpts[-1]
    seen = {read_meta(c).get("tokens_seen"): c for c in ckpts}
    if tokens not in seen:
        raise ConfigError(f"config key 'teacher.checkpoint_tokens': {tokens:,} names no checkpoint of {run_dir} "
                          f"(it has {', '.join(f'{t:,}' for t in sorted(t for t in seen if t is not None))})")
    return seen[tokens]


def load_backbone(path: Path, what: str = "teacher", any_lm: bool = False):
    """The model of a folder: one of our checkpoints (`model_type: cocomix`) or a transformers GPT-2
    folder, imported into our backbone (`CocomixForCausalLM.from_gpt2`); with `any_lm` (a teacher) any
    other transformers causal LM, seen through our interface (`HFTeacher`, cocomix/hf_teacher.py)."""
    model_type = read_json(path / "config.json").get("model_type")
    try:
        if model_type == "cocomix":
            return CocomixForCausalLM.from_pretrained(path)
        if model_type == "gpt2":
            from transformers import GPT2LMHeadModel  # lazy: only GPT-2 folders

            return CocomixForCausalLM.from_gpt2(GPT2LMHeadModel.from_pretrained(path))
        if any_lm:
            return load_hf_teacher(path)
        raise DataError(f"{what} {path}: model_type {model_type!r} is neither 'cocomix' nor 'gpt2' (its weights do "
                        "not map onto this backbone)")
    except OSError as e:  # missing or unreadable weights
        raise DataError(f"{what} {path}: cannot load weights ({str(e).splitlines()[0]})") from None


def init_from(model: CocomixForCausalLM, path: str | Path) -> dict[str, list[str]]:
    """`model.init_from`: copy the weights of a checkpoint (a run folder: its latest), or a GPT-2 folder,
    into `model` before training (weights only). Every tensor both have must have the same shape (else
    one line naming it); the model's tensors the checkpoint lacks (e.g. a slot module's) keep their
    fresh init. Returns {"loaded", "kept", "unused"} tensor names."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and list_checkpoints(path):
        path = _run_checkpoint(path, None)
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model.init_from': {path} is not a model folder (no config.json), a run "
                          "folder with checkpoints, or a GPT-2 folder")
    theirs = load_backbone(path, "model.init_from").state_dict()
    ours, real = model.state_dict(), model.config.real_vocab_size
    for name in VOCAB_ROWS:  # padding rows (model.vocab_multiple) may differ: the real ones are copied
        if name in theirs and name in ours and theirs[name].shape[1:] == ours[name].shape[1:] \
                and min(len(theirs[name]), len(ours[name])) >= real:
            theirs[name] = torch.cat([theirs[name][:real], ours[name][real:]])
    for name, tensor in theirs.items():
        if name in ours and ours[name].shape != tensor.shape:
            raise ConfigError(f"config key 'model.init_from': tensor {name} is {tuple(tensor.shape)} in {path} but "
                              f"{tuple(ours[name].shape)} in the model (model.n_embd, n_layer, vocab_size must match)")
    loaded = [n for n in theirs if n in ours]
    with torch.no_grad():
        for name in loaded:
            ours[name].copy_(theirs[name])
    return {"loaded": loaded, "kept": [n for n in ours if n not in theirs], "unused": [n for n in theirs if n not in ours]}


def load_teacher(cfg: Config, device: torch.device | str = "cpu") -> CocomixForCausalLM:
    """The frozen teacher of `cfg.teacher.path`, in eval mode (no dropout) and without gradients
    on its weights (attribution differentiates w.r.t. activations only)."""
    path = teacher_dir(cfg)
    model = load_backbone(path, any_lm=True)
    if (cfg.data_dir / "manifest.json").is_file():
        check_teacher_vocabulary(cfg, path, model)
    if getattr(model.config, "slot", "none") not in ("none", None):
        raise DataError(f"teacher {path}: a '{model.config.slot}'-slot model; the teacher must be a plain LM")
    model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return model


def check_teacher_vocabulary(cfg: Config, path: Path, model) -> None:
    """The teacher reads the student's token ids, so it must share the tokenizer the shards were made
    with: a teacher folder with a tokenizer must hold that very one, and no teacher may have fewer
    token ids than the data uses (one line naming teacher.path otherwise)."""
    manifest = load_manifest(cfg.data_dir, verify=False)
    if model.config.real_vocab_size <= manifest["max_token_id"]:
        raise ConfigError(f"config key 'teacher.path': teacher {path} has {model.config.real_vocab_size:,} token ids but "
                          f"the data ({cfg.data_dir}) uses ids up to {manifest['max_token_id']:,}: the teacher must share "
                          "the students' tokenizer")
    if (path / "tokenizer.json").is_file():  # a DataError naming the teacher's tokenizer and the data
        check_tokenizer_matches(cfg.data_dir, path)


def teacher_shape(cfg: Config) -> CocomixForCausalLM:
    """The teacher's architecture without its weights (the meta device): what FLOP counts read."""
    path = teacher_dir(cfg)
    model_type = read_json(path / "config.json").get("model_type")
    with torch.device("meta"):
        if model_type == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel  # lazy: only GPT-2 teachers

            return CocomixForCausalLM.from_gpt2(GPT2LMHeadModel(GPT2Config.from_pretrained(path)))
        if model_type != "cocomix":
            return load_hf_teacher(path, meta=True)
        return CocomixForCausalLM(CocomixConfig.from_pretrained(path))


def teacher_training_flops(cfg: Config) -> tuple[float | None, str]:
    """(FLOPs, how they were counted) of training the teacher: a teacher run folder's (the DAG's own
    'teacher', or `teacher.path` inside a run) checkpoint tokens x its flops_per_token; otherwise
    `teacher.training_flops` as the config states it, or (None, "not counted")."""
    path = teacher_dir(cfg)
    run = find_checkpoints(path)[0] if is_checkpoint(path) else None  # the run folder holding it
    if run is not None and (run / "final_metrics.json").is_file():
        tokens = read_meta(path).get("tokens_seen")
        per_token = read_json(run / "final_metrics.json").get("flops_per_token")
        if tokens and per_token:
            return float(tokens) * float(per_token), f"counted: teacher run {run.name}, {tokens:,} tokens"
    if cfg.teacher.training_flops is not None:
        return float(cfg.teacher.training_flops), "given: teacher.training_flops"
    return None, "not counted (a given teacher; teacher.training_flops states it)"


def teacher_hash(cfg: Config) -> str:
    """sha256 of the teacher's config.json and weight file: the teacher's identity in caches."""
    path = teacher_dir(cfg)
    h = hashlib.sha256((path / "config.json").read_bytes())
    weights = [path / f for f in _WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        raise DataError(f"teacher {path}: no weights (expected one of {list(_WEIGHT_FILES)})")
    return update_sha256(h, weights[0]).hexdigest()


class _Stop(Exception):
    """Raised by the hook to skip the blocks above `layer` when only the activation is needed."""


def run_teacher(
    teacher: CocomixForCausalLM,
    input_ids: torch.Tensor,
    layer: int,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_at_layer: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run the teacher and return (logits (B, T, V) or None, h (B, T, d)).

    h is the output of block `layer`, detached and made a leaf that requires grad, so
    `torch.autograd.grad(loss, h)` gives dL/dh (spec 1.2 step 2) without any teacher weight in
    the graph. `edit(h)` replaces the activation seen by the upper blocks (e.g. by the SAE
    reconstruction). `stop_at_layer` skips everything above `layer` (logits come back None).
    """
    n_layer = teacher.config.n_layer
    if not 0 <= layer < n_layer:
        raise ConfigError(f"config key 'sae.layer': {layer} is not a block of the {n_layer}-block teacher")
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        h = layer_output(output).detach().requires_grad_(torch.is_grad_enabled())
        captured["h"] = h
        if stop_at_layer:
            raise _Stop
        return with_layer_output(output, edit(h) if edit is not None else h)

    handle = teacher.transformer.h[layer].register_forward_hook(hook)
    try:
        logits = teacher(input_ids=input_ids, use_cache=False).logits
    except _Stop:
        logits = None
    finally:
        handle.remove()
    return logits, captured["h"]

