"""The checkpoint format, in one place: where a run folder keeps its checkpoints, what a checkpoint
holds, how it is written, verified, found, read and pruned. The training callback
(`cocomix.callbacks.Checkpointer`) only decides when to save and resumes through this module;
evaluation, export, the teacher and tracking read checkpoints through it. Nothing here imports torch
at import time (the Snakefile imports the sweep, which imports tracking, which lists checkpoints).

    <run>/checkpoints/step_<N>/   a Hugging Face model folder, loadable by AutoModelForCausalLM as it
                                  stands: model.safetensors, config.json (auto_map), model.py and
                                  slots.py (remote code), generation_config.json, the tokenizer (its
                                  model_max_length = the model's context, n_positions)
        checkpoint.json           step, tokens, method, config fingerprint, metrics.jsonl prefix, and
                                  the size and sha256 of every file written with it (the seal: what a
                                  loader reads, config.json and the tokenizer included)
        trainer/                  what only resuming reads: trainer_state.pt (step, tokens seen, data
                                  position, tokens per step, every process's RNG states) and
                                  optimizer.pt

A checkpoint is written to `step_<N>.tmp<pid>/` and renamed into place when complete, so a listed
checkpoint is always whole. Checkpoints written before the trainer/ folder (trainer_state.pt and
optimizer.pt beside the weights) still list, verify, resume and prune.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from cocomix.data.errors import DataError
from cocomix.faults import point
from cocomix.files import clear_stale_tmp, follow_umask, read_json, sha256_file, torch_save, write_failure

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints
STEP_RE = re.compile(r"^step_(\d+)$")
META = "checkpoint.json"
WEIGHTS = "model.safetensors"
TRAINER_DIR = "trainer"  # the folder of a checkpoint that holds the trainer state, apart from the model files
TRAINER_STATE = "trainer_state.pt"
OPTIMIZER = "optimizer.pt"
OPTIMIZER_SHARDS = "optimizer"  # train.parallel=fsdp: the optimizer state, a torch.distributed.checkpoint folder
TRAINER_FILES = (TRAINER_STATE, OPTIMIZER)  # what an exported model folder must never hold
# What every checkpoint.json records (size and sha256) and resume verifies before loading anything;
# checkpoints since 2026-12-07 record every file written with them (`sealed_files`).
VERIFIED = (WEIGHTS, f"{TRAINER_DIR}/{TRAINER_STATE}", f"{TRAINER_DIR}/{OPTIMIZER}")


def sealed_files(folder: Path) -> list[str]:
    """Every file of a checkpoint being written (relative names), its record excepted: the seal."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != META)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or resumed from (one line naming it)."""


# ---- finding checkpoints ----


def step_path(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` in a run folder."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def trainer_folder(path: Path) -> Path | None:
    """Where a checkpoint's trainer_state.pt (and optimizer.pt) live: `<path>/trainer/`, or `<path>`
    itself for checkpoints written before that folder; None when it has no trainer state."""
    for folder in (Path(path) / TRAINER_DIR, Path(path)):
        if (folder / TRAINER_STATE).is_file():
            return folder
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoints/step_<N>/` with trainer state) of a run, oldest first;
    temporary folders of an interrupted save are ignored."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_RE.match(p.name) and trainer_folder(p) is not None]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def checkpoint_files(run_dir: str | Path, name: str, complete_only: bool = True) -> list[Path]:
    """The file `name` (e.g. an evaluation's eval.json) of each of a run's checkpoints that has one,
    oldest first; `complete_only=False`: of every folder under checkpoints/, whatever its state (a
    checkpoint moved aside as damaged, or copied without its trainer state), in name order."""
    if not complete_only:
        return sorted((Path(run_dir) / CHECKPOINTS).glob(f"*/{name}"))
    return [p / name for p in list_checkpoints(run_dir) if (p / name).is_file()]


def is_checkpoint(path: Path) -> bool:
    """A model folder with its checkpoint record (a training checkpoint, wherever it was copied)."""
    return (path / "config.json").is_file() and (path / META).is_file()


def find_checkpoints(path: str | Path) -> tuple[Path | None, list[Path]]:
    """(run folder or None, checkpoints oldest first) for a run folder or one checkpoint folder: how
    evaluation, export and the interpretability commands read a path."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (expected a run folder or a checkpoint folder)")
    if is_checkpoint(path):
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
        if run_dir is not None and not (run_dir / "config.yaml").is_file():
            run_dir = None
        return run_dir, [path]
    if (path / "config.yaml").is_file():
        ckpts = [c for c in list_checkpoints(path) if is_checkpoint(c)]
        if not ckpts:
            raise DataError(f"{path}: run folder has no complete checkpoint under {CHECKPOINTS}/")
        return path, ckpts
    raise DataError(f"{path}: neither a run folder (config.yaml) nor a checkpoint folder (config.json + {META})")


def run_config(run_dir: Path):
    """The resolved config a run folder was trained with (its config.yaml)."""
    from cocomix.config import config_from_dict, read_yaml  # lazy: only a reader of a run folder's config needs it

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml, not a run folder")
    return config_from_dict(read_yaml(path))


def belongs_to(path: Path, run_dir: Path) -> bool:
    """Whether checkpoint `path` is one of `run_dir`'s own (not a checkpoint of another run)."""
    return Path(path).resolve().parent.parent == Path(run_dir).resolve()


# ---- reading and verifying ----


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's checkpoint.json (raises OSError / ValueError when unreadable)."""
    return read_json(Path(path) / META)


def damage(path: Path, model_only: bool = False) -> str | None:
    """What is wrong with a checkpoint, in a few words, or None: every file checkpoint.json lists
    (`model_only`: but the trainer state) must have its recorded size and sha256 (checkpoints from
    before these records: sizes unknown, only their presence is checked)."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"{META} unreadable ({type(e).__name__})"
    for name, want in meta.get("files", {}).items():
        if model_only and name.startswith(f"{TRAINER_DIR}/"):
            continue
        f = path / name
        if not f.exists():
            shards = path / TRAINER_DIR / OPTIMIZER_SHARDS
            if Path(name).name == OPTIMIZER or (name.startswith(f"{TRAINER_DIR}/{OPTIMIZER_SHARDS}/")
                                                and not shards.exists()):
                continue  # pruned on purpose from older checkpoints (checkpoint.keep_optimizer)
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {META} records {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{name} does not match its sha256 in {META}"
    return None


def model_damage(path: Path) -> str | None:
    """`damage` of what loading the model reads (evaluation, export): every sealed file but the
    trainer state (older checkpoints, which sealed only the weights and the trainer state: the weights)."""
    return damage(path, model_only=True)


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are moved aside (`<name>.damaged`,
    which no reader lists) with one warning line each."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = damage(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        print(f"warning: checkpoint {path} is damaged ({problem}); moved to {aside}, resuming from the "
              "one before it", file=sys.stderr, flush=True)
    return None


def newest_fingerprint(run_dir: Path) -> str | None:
    """The config fingerprint of the newest checkpoint whose record is readable (None: no such one)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_meta(path).get("config_fingerprint")
        except (OSError, ValueError):
            continue  # damaged: resume moves it aside
    return None


def supersede(run_dir: Path) -> Path:
    """Move everything a run folder holds (not its lock) into `superseded-<n>/`; returns that folder."""
    n = 1 + sum(1 for p in run_dir.iterdir() if p.name.startswith("superseded-"))
    dest = run_dir / f"superseded-{n}"
    dest.mkdir()
    for entry in run_dir.iterdir():  # everything the old run wrote (eval outputs too), not the lock
        if entry.name != ".lock" and not entry.name.startswith("superseded-"):
            os.replace(entry, dest / entry.name)
    warnings.warn(f"{run_dir}: its checkpoints were made with another config; moved to {dest}, "
                  "starting over", stacklevel=3)
    return dest


def clear_litter(run_dir: Path) -> None:
    """Remove what killed writers left: temporary checkpoint folders (a whole checkpoint's size
    each) and temporary files of atomic writes. Safe only for the holder of the run's lock."""
    for tmp in (Path(run_dir) / CHECKPOINTS).glob("step_*.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
    clear_stale_tmp(run_dir)


def load_trainer_state(path: Path) -> tuple[dict[str, Any], Path]:
    """(trainer_state.pt's content, the folder holding it) of checkpoint `path`: tensors and plain data
    only, so a crafted file cannot run code here."""
    import torch  # lazy: torch only when a checkpoint is read

    folder = trainer_folder(path)
    if folder is None:
        raise CheckpointError(f"checkpoint {path}: has no {TRAINER_DIR}/{TRAINER_STATE}")
    name = (folder / TRAINER_STATE).relative_to(path)
    try:
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path}: {name} holds objects other than tensors and plain "
                              "data (written before cocomix stored RNG states as tensors, or not by cocomix); "
                              "refusing to unpickle it: start a new run folder or set train.resume=never") from None
    return state, folder


def load_weights(path: Path, device: str) -> dict:
    """The model's tensors (model.safetensors) of checkpoint `path`, on `device`."""
    from safetensors.torch import load_file  # lazy: torch only when a checkpoint is read

    return load_file(str(Path(path) / WEIGHTS), device=str(device))


def optimizer_state(path: Path, state: dict, folder: Path | None = None) -> dict:
    """The optimizer state of checkpoint `path`, from `folder` (where its trainer_state.pt is)."""
    import torch  # lazy: torch only when a checkpoint is read

    folder = path if folder is None else folder
    if "optimizer" in state:  # checkpoints written before optimizer.pt
        return state["optimizer"]
    name = (folder / OPTIMIZER).relative_to(path)
    if not (folder / OPTIMIZER).exists():
        raise CheckpointError(f"checkpoint {path}: has no {name} (only the newest checkpoint.keep_optimizer "
                              "checkpoints keep the optimizer state); resume from a newer one or start a new run folder")
    try:  # mmap: each process maps the file instead of reading a private copy of it
        return torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path}: {name} holds objects other than tensors and plain data; "
                              "refusing to unpickle it") from None


# ---- writing ----


def temporary(final: Path) -> Path:
    """The folder checkpoint `final` is written in before it is renamed into place."""
    return final.with_name(final.name + f".tmp{os.getpid()}")


def clear_temporary(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def write(final: Path, model, tokenizer_dir: Path, trainer_state: dict[str, Any], optimizer: dict | None,
          meta: dict[str, Any], weights: dict | None = None) -> Path:
    """Write checkpoint `final` (a `step_path`): the model folder, the tokenizer, trainer/ and then
    checkpoint.json (`meta` plus every file's size and sha256), all in a temporary folder renamed
    into place when complete. `optimizer` None: its shards are in the temporary folder already
    (`trainer/optimizer/`, train.parallel=fsdp); `weights`: the tensors to write instead of `model`'s
    (a sharded model's, gathered; `model` is then its empty twin, `parallel.empty_twin`).
    A write the filesystem refuses (full, quota, size limit, read-only) leaves no temporary folder
    and is one line naming the file and the checkpoint intact."""
    tmp = temporary(final)
    if optimizer is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    doing = ["model.safetensors"]  # the file being written, for the message
    try:
        _write(tmp, final, model, tokenizer_dir, trainer_state, optimizer, meta, doing, weights)
    except BaseException as e:  # the failed write's folder goes; a full disk is one line
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [c.name for c in list_checkpoints(final.parent.parent) if c != final]
        failure = write_failure(e, tmp, f"the previous checkpoint {earlier[-1]} is intact (a resume continues from "
                                        "it once the cause is removed)" if earlier else "no earlier checkpoint exists",
                                what=f"checkpoint {final} ({doing[0]})")
        if failure is None:
            raise
        raise failure from None
    point("checkpoint.renamed")
    return final


def _write(tmp: Path, final: Path, model, tokenizer_dir: Path, trainer_state: dict, optimizer: dict | None,
           meta: dict, doing: list[str], weights: dict | None) -> None:
    from cocomix.data.tokenizer import set_model_max_length  # lazy: only a save needs it

    model.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
    point("checkpoint.model.safetensors")
    doing[0] = "tokenizer"
    shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
    set_model_max_length(tmp, model.config.n_positions)  # the data's tokenizer says 1e30
    state_dir = tmp / TRAINER_DIR
    state_dir.mkdir(exist_ok=optimizer is None)
    doing[0] = f"{TRAINER_DIR}/{TRAINER_STATE}"
    torch_save(trainer_state, state_dir / TRAINER_STATE)
    point("checkpoint.trainer_state.pt")
    if optimizer is not None:
        doing[0] = f"{TRAINER_DIR}/{OPTIMIZER}"
        torch_save(optimizer, state_dir / OPTIMIZER)
        point("checkpoint.optimizer.pt")
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
             for name in sealed_files(tmp)}
    doing[0] = META
    (tmp / META).write_text(json.dumps({**meta, "files": files}))
    point("checkpoint.checkpoint.json")
    follow_umask(tmp)  # safetensors writes 0600: colleagues could not read the weights
    os.replace(tmp, final)


def prune(run_dir: Path, keep: int, keep_optimizer: int) -> None:
    """After a new checkpoint is complete: drop checkpoints beyond `keep`, and the optimizer state of
    those beyond `keep_optimizer` (0: keep all; a kill in between leaves only extra files)."""
    ckpts = list_checkpoints(run_dir)
    if keep > 0:
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if keep_optimizer > 0:
        for old in ckpts[:-keep_optimizer]:
            (old / TRAINER_DIR / OPTIMIZER).unlink(missing_ok=True)
            shutil.rmtree(old / TRAINER_DIR / OPTIMIZER_SHARDS, ignore_errors=True)
            (old / OPTIMIZER).unlink(missing_ok=True)  # checkpoints written before trainer/


# ---- RNG states ----


def rng_state() -> dict:
    """Every RNG state as tensors and plain data, so trainer_state.pt loads with weights_only=True
    (numpy's key array becomes an int64 tensor; nothing in a checkpoint can execute code on load).
    On CUDA, the state of this process's own device only: a job may resume where another number of
    GPUs is visible, or on another GPU (the claimed device is always this process's cuda:0)."""
    import numpy as np
    import torch  # lazy: torch only when a checkpoint is written

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def cuda_rng_for_this_device(saved, device_index: int):
    """The CUDA RNG state to restore on this process's device: the saved tensor, or from an older
    checkpoint's list of every visible device's states the entry of this device (None if absent)."""
    if isinstance(saved, (list, tuple)):
        return saved[device_index] if device_index < len(saved) else None
    return saved


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch  # lazy: torch only when a checkpoint is read

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = cuda_rng_for_this_device(state["cuda"], torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def seed_rngs(seed: int) -> None:
    """Fresh RNG streams for a process the checkpoint has no state for."""
    import numpy as np
    import torch  # lazy: torch only when a run starts

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
