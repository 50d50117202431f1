"""The small components around the training loop (as OLMo-core's callbacks): each one is a plain
object that overrides the few hooks it needs, and the loop only calls them.

    on_start(trainer)                  once, before the first step (after any resume)
    before_optimizer_step(trainer, s)  after the backward pass of a step, before clipping and AdamW
    on_step(trainer, s, record)        after each optimizer step; add metrics to `record`, which the
                                       tracker logs (components run in list order)
    on_end(trainer, final)             the run is complete; add entries to final_metrics.json
    on_finish(trainer, status)         always, last: FINISHED, KILLED (EarlyStop) or FAILED

`trainer.default_callbacks()` lists them in order: the NaN guard, progress, train metrics and
throughput/MFU, held-out evaluation, tracking, checkpointing, the `on_eval` hook (sweep pruning).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from cocomix.config import dump_config
from cocomix.device import all_reduce_mean, barrier, sync
from cocomix.faults import point
from cocomix.files import atomic_write_json, clear_stale_tmp, follow_umask, list_checkpoints, sha256_file
from cocomix.progress import Reporter, si
from cocomix.tracking import PENDING, MetricsLog, RunTracker, environment_info


class TrainingError(RuntimeError):
    """A run that cannot continue (diverged, incompatible checkpoint); one-line message."""


class EarlyStop(Exception):
    """Raised by an `on_eval` callback to end a run early (a pruned sweep trial). The MLflow run is
    marked KILLED and no final_metrics.json is written."""


class Callback:
    def on_start(self, trainer) -> None:
        pass

    def before_optimizer_step(self, trainer, step) -> None:
        pass

    def on_step(self, trainer, step, record: dict[str, float]) -> None:
        pass

    def on_end(self, trainer, final: dict) -> None:
        pass

    def on_finish(self, trainer, status: str) -> None:
        pass


class NaNGuard(Callback):
    """Stops a run whose loss or gradient norm became non-finite, without a host sync every step:
    each step folds `isfinite` into a flag on the device, read at log steps and before every
    checkpoint (so no checkpoint holds the weights of a diverged step). The one-line error names the
    newest checkpoint saved before it, whose weights are finite."""

    def on_start(self, trainer) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=trainer.device)
        self.checked = trainer.step  # the last step known good

    def on_step(self, trainer, step, record) -> None:
        self.bad |= ~torch.isfinite(step.loss)
        if step.grad_norm is not None:
            self.bad |= ~torch.isfinite(step.grad_norm)
        t = trainer.cfg
        if (trainer.step % t.train.log_every_steps == 0 or trainer.finished
                or trainer.crossed(t.checkpoint.every_tokens) or trainer.crossed(t.eval.every_tokens)):
            self.check(trainer)

    def check(self, trainer) -> None:
        bad = self.bad.float()
        if trainer.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every process stops together
        if bad.item():
            last = trainer.checkpointer.last_saved
            raise TrainingError(f"non-finite loss or gradient norm between step {self.checked + 1} and step "
                                f"{trainer.step} (tokens {trainer.tokens_seen}); last good checkpoint: "
                                f"{last or 'none (no checkpoint was saved before it)'}")
        self.checked = trainer.step


class TrainMetrics(Callback):
    """Every `train.log_every_steps` (and at the last step): loss and the method's loss parts
    (averaged over processes), lr, gradient norm, and throughput: tokens/s over the window since the
    last line, and MFU on GPUs. Windows leave out the first step of a process (torch.compile, CUDA
    warm-up) and evaluation and checkpoint time (`trainer.untimed`); final_metrics.json gets the
    run's average over the timed steps (`tokens_per_s`, `mfu`)."""

    def on_start(self, trainer) -> None:
        self.window_tokens, self.window_start, self.window_untimed = 0, None, 0.0
        self.total_tokens, self.total_s = 0, 0.0

    def _open_window(self, trainer) -> None:
        self.window_tokens, self.window_start, self.window_untimed = 0, time.perf_counter(), trainer.untimed_s

    def on_step(self, trainer, step, record) -> None:
        if self.window_start is None:  # the first step: compile and warm-up, not throughput
            sync(trainer.device)
            self._open_window(trainer)
        else:
            self.window_tokens += trainer.tokens_per_step
        if trainer.step % trainer.cfg.train.log_every_steps and not trainer.finished:
            return
        record.update({"train/loss": all_reduce_mean(step.loss, trainer.dist).item(), "train/lr": step.lr,
                       "train/grad_norm": step.grad_norm.item()})  # .item() waits for the queued steps
        for k, v in step.parts.items():
            record[f"train/{k}"] = all_reduce_mean(v, trainer.dist).item()
        if self.window_tokens:
            seconds = max(time.perf_counter() - self.window_start - (trainer.untimed_s - self.window_untimed), 1e-9)
            self.total_tokens += self.window_tokens
            self.total_s += seconds
            record["train/tokens_per_s"] = self.window_tokens / seconds
            if trainer.peak_flops:
                record["train/mfu"] = self.mfu(trainer, record["train/tokens_per_s"])
        self._open_window(trainer)

    @staticmethod
    def mfu(trainer, tokens_per_s: float) -> float:
        return tokens_per_s * trainer.flops_per_token / (trainer.peak_flops * trainer.dist.world_size)

    def on_end(self, trainer, final) -> None:
        final["tokens_per_s"] = self.total_tokens / self.total_s if self.total_s else None
        final["mfu"] = self.mfu(trainer, final["tokens_per_s"]) if trainer.peak_flops and self.total_s else None


class Progress(Callback):
    """The start line, then (main process only) a tqdm bar on a terminal with `progress` on, else a
    plain line every `train.log_every_steps` (cocomix/progress.py): step, tokens, loss, lr,
    throughput, time left. Both show the values TrainMetrics put in the record at log steps (reading
    the loss every step would wait for the GPU every step). Time left is measured from the end of
    this process's first step (torch.compile and warm-up), evaluation and checkpoints included."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.reporter = None

    def on_start(self, trainer) -> None:
        if not trainer.dist.is_main:
            return
        where = f"resumed from {trainer.resumed_from}" if trainer.resumed_from else "starting from scratch"
        print(f"{trainer.cfg.resolved_run_name}: {where} (step {trainer.step}/{trainer.total_steps}, "
              f"tokens {trainer.tokens_seen:,}/{trainer.total_steps * trainer.tokens_per_step:,})", flush=True)
        self.reporter = Reporter(f"train {trainer.cfg.resolved_run_name}", trainer.total_steps, "step",
                                 self.enabled, initial=trainer.step)
        self.first_step = True

    def on_step(self, trainer, step, record) -> None:
        if self.reporter is None:
            return
        loss = {"loss": f"{record['train/loss']:.3f}"} if "train/loss" in record else {}
        self.reporter.update(1, **loss)
        if self.first_step:
            self.reporter.restart_clock()
            self.first_step = False
        if loss:
            self.reporter.line(self.describe(trainer, record))

    @staticmethod
    def describe(trainer, record) -> str:
        text = (f"step {trainer.step}/{trainer.total_steps} tokens {trainer.tokens_seen:,} "
                f"loss {record['train/loss']:.3f} lr {record['train/lr']:.2e}")
        if "train/tokens_per_s" in record:
            text += f" {si(record['train/tokens_per_s'])} tok/s"
        if "train/mfu" in record:
            text += f" mfu {record['train/mfu']:.1%}"
        return text

    def on_finish(self, trainer, status) -> None:
        if self.reporter is not None:
            self.reporter.close()


class Evaluator(Callback):
    """Held-out loss every `eval.every_tokens` and at the end (`trainer.evaluate`)."""

    def on_step(self, trainer, step, record) -> None:
        if trainer.crossed(trainer.cfg.eval.every_tokens) or trainer.finished:
            with trainer.untimed():
                trainer.last_val = trainer.evaluate()
            record.update(trainer.last_val)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (some containers)
        return str(os.getuid())


class Tracking(Callback):
    """The run's record: config.yaml and environment.json in the run folder, metrics.jsonl, and the
    MLflow run (params, tags, metrics at step = tokens seen, final_metrics.json as an artifact)."""

    def __init__(self):
        self.tracker: RunTracker | None = None

    def on_start(self, trainer) -> None:
        if not trainer.dist.is_main:
            return
        cfg, env = trainer.cfg, environment_info()
        dump_config(cfg, trainer.run_dir / "config.yaml")
        atomic_write_json(trainer.run_dir / "environment.json", env)
        tags = {"experiment": cfg.experiment, "method": trainer.method.name, "scale": cfg.scale or "base",
                "seed": str(cfg.seed), "git_commit": env["git_commit"], "device": env["device"],
                "world_size": str(trainer.dist.world_size), "ablation": "none",  # plan.py tags ablations
                # MLflow's own tags: its UI's User and Source columns, and its filters
                "mlflow.user": _user(), "mlflow.source.git.commit": env["git_commit"].removesuffix("-dirty"),
                "mlflow.source.name": "cocomix train"}
        self.tracker = RunTracker(cfg, trainer.run_dir, tags,
                                  params={f"accounting.{k}": v for k, v in trainer.accounting.items()})
        self._truncate_log(trainer)
        if (trainer.run_dir / PENDING).is_file():  # an earlier start ran without MLflow: send what it lacks
            self.tracker.sync()
        if trainer.resumed_from is None:
            self.tracker.log_artifact(trainer.run_dir / "config.yaml")
            self.tracker.log_artifact(trainer.run_dir / "environment.json")

    def _truncate_log(self, trainer) -> None:
        """metrics.jsonl as it was at the checkpoint resumed from (from scratch: empty)."""
        log, ckpt = self.tracker.metrics, trainer.resumed_from
        if ckpt is None:
            log.truncate_to({"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}, trainer.run_dir)
            return
        prefix = json.loads((ckpt / "checkpoint.json").read_text()).get("metrics_jsonl")
        own = Path(ckpt).resolve().parent.parent == trainer.run_dir.resolve()  # not a checkpoint of another run
        if prefix is not None and own:
            log.truncate_to(prefix, ckpt)
        else:
            log.truncate_after(trainer.tokens_seen)

    def on_step(self, trainer, step, record) -> None:
        if record and self.tracker is not None:
            self.tracker.log({"step": trainer.step, "tokens_seen": trainer.tokens_seen, **record})

    def on_end(self, trainer, final) -> None:
        final["mlflow_run_id"] = self.tracker.run_id if self.tracker else None

    def on_finish(self, trainer, status) -> None:
        if self.tracker is None:
            return
        if status == "FINISHED":
            self.tracker.log_artifact(trainer.run_dir / "final_metrics.json")
        self.tracker.finish(status)


class OnEval(Callback):
    """Calls `fn(tokens_seen, val_metrics)` after each held-out evaluation, once the point is logged and
    any checkpoint saved (a sweep's pruning: it may raise EarlyStop)."""

    def __init__(self, fn: Callable[[int, dict[str, float]], None]):
        self.fn = fn

    def on_step(self, trainer, step, record) -> None:
        if "val/loss" in record:
            self.fn(trainer.tokens_seen, trainer.last_val)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG state as tensors and plain data, so trainer_state.pt loads with weights_only=True
    (numpy's key array becomes an int64 tensor; nothing in a checkpoint can execute code on load).
    On CUDA, the state of this process's own device only: a job may resume where another number of
    GPUs is visible, or on another GPU (the claimed device is always this process's cuda:0)."""
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpointer(Callback):
    """`checkpoints/step_<N>/` every `checkpoint.every_tokens` and at the end, written to a temporary
    folder renamed into place when complete:

        step_<N>/                   a Hugging Face model folder, loadable by AutoModelForCausalLM as it
                                    stands: model.safetensors, config.json (auto_map), model.py and
                                    slots.py (remote code), generation_config.json, the tokenizer (its
                                    model_max_length = the model's context, n_positions)
        step_<N>/checkpoint.json    step, tokens, config fingerprint, size and sha256 of VERIFIED
        step_<N>/trainer/           what only resuming reads: trainer_state.pt (step, tokens seen, data
                                    position, every process's RNG states) and optimizer.pt

    Only the newest `checkpoint.keep_last` are kept, and only the newest `checkpoint.keep_optimizer`
    keep trainer/optimizer.pt (resuming reads the newest; evaluation never reads it). Checkpoints
    written before the trainer/ folder (trainer_state.pt and optimizer.pt beside the weights) still
    resume, verify and prune."""

    # The folder of a checkpoint that holds the trainer state, apart from the model files.
    TRAINER_DIR = "trainer"
    # What checkpoint.json records (size and sha256) and resume verifies before loading anything.
    VERIFIED = ("model.safetensors", "trainer/trainer_state.pt", "trainer/optimizer.pt")

    @classmethod
    def trainer_folder(cls, path: Path) -> Path | None:
        """Where a checkpoint's trainer_state.pt (and optimizer.pt) live: `<path>/trainer/`, or `<path>`
        itself for checkpoints written before that folder; None when it has no trainer state."""
        for folder in (path / cls.TRAINER_DIR, path):
            if (folder / "trainer_state.pt").is_file():
                return folder
        return None

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.last_saved: Path | None = None  # the newest checkpoint this run saved or resumed from

    def on_step(self, trainer, step, record) -> None:
        if trainer.crossed(trainer.cfg.checkpoint.every_tokens) or trainer.finished:
            with trainer.untimed():
                self.save(trainer)

    # ---- resume ----

    def resume(self, trainer) -> Path | None:
        """Load the checkpoint `train.resume` names (auto: this run folder's newest); return its path."""
        resume = trainer.cfg.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            self.supersede_stale_run(trainer)
            if trainer.dist.is_main:
                self.clear_litter(trainer.run_dir)
            path = self.newest_intact(trainer)
            if path is None:
                return None
        else:
            path = Path(resume)
            if self.trainer_folder(path) is None:
                raise TrainingError(f"train.resume: '{path}' is not a checkpoint (no trainer/trainer_state.pt)")
            problem = self.damage(path)
            if problem:
                raise TrainingError(f"train.resume: checkpoint {path} is damaged: {problem}")
        self.load(trainer, path)
        self.last_saved = path
        return path

    @staticmethod
    def clear_litter(run_dir: Path) -> None:
        """Remove what killed writers left: temporary checkpoint folders (a whole checkpoint's size
        each) and temporary files of atomic writes. Safe: this process holds the run's lock."""
        for tmp in (run_dir / "checkpoints").glob("step_*.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        clear_stale_tmp(run_dir)

    @staticmethod
    def damage(path: Path, only: tuple[str, ...] | None = None) -> str | None:
        """What is wrong with a checkpoint, in a few words, or None: every file checkpoint.json lists
        (or those of `only`) must have its recorded size and sha256 (checkpoints from before these
        records: sizes unknown, only their presence is checked)."""
        try:
            meta = json.loads((path / "checkpoint.json").read_text())
        except (OSError, ValueError) as e:
            return f"checkpoint.json unreadable ({type(e).__name__})"
        for name, want in meta.get("files", {}).items():
            if only is not None and name not in only:
                continue
            f = path / name
            if not f.exists():
                if Path(name).name == "optimizer.pt":
                    continue  # pruned on purpose from older checkpoints (checkpoint.keep_optimizer)
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, checkpoint.json records {want['bytes']}"
            if sha256_file(f) != want["sha256"]:
                return f"{name} does not match its sha256 in checkpoint.json"
        return None

    def newest_intact(self, trainer) -> Path | None:
        """The newest checkpoint that verifies; damaged newer ones are moved aside (`<name>.damaged`,
        which no reader lists) with one warning line each, and the run resumes from the one before."""
        found = [None]
        if trainer.dist.is_main:  # one process hashes (gigabytes at scale); the others are told the result
            for path in reversed(list_checkpoints(trainer.run_dir)):
                problem = self.damage(path)
                if problem is None:
                    found[0] = str(path)
                    break
                aside = path.with_name(path.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                print(f"warning: checkpoint {path} is damaged ({problem}); moved to {aside}, resuming from the "
                      "one before it", file=sys.stderr, flush=True)
        if trainer.dist.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def supersede_stale_run(self, trainer) -> None:
        """A run folder whose checkpoints came from another config is moved aside, not resumed:
        resuming it would silently mix two experiments (e.g. after a DAG rerun for a changed lr)."""
        meta = None
        for path in reversed(list_checkpoints(trainer.run_dir)):  # the newest readable record decides
            try:
                meta = json.loads((path / "checkpoint.json").read_text())
                break
            except (OSError, ValueError):
                continue  # damaged: resume moves it aside
        if meta is None or meta.get("config_fingerprint") == self.fingerprint:
            return
        barrier(trainer.dist)
        if trainer.dist.is_main:
            run_dir = trainer.run_dir
            n = 1 + sum(1 for p in run_dir.iterdir() if p.name.startswith("superseded-"))
            dest = run_dir / f"superseded-{n}"
            dest.mkdir()
            for entry in run_dir.iterdir():  # everything the old run wrote (eval outputs too), not the lock
                if entry.name != ".lock" and not entry.name.startswith("superseded-"):
                    os.replace(entry, dest / entry.name)
            warnings.warn(f"{run_dir}: its checkpoints were made with another config; moved to {dest}, "
                          "starting over", stacklevel=2)
        barrier(trainer.dist)

    def load(self, trainer, path: Path) -> None:
        folder = self.trainer_folder(path)
        if folder is None:
            raise TrainingError(f"checkpoint {path}: has no trainer/trainer_state.pt")
        name = (folder / "trainer_state.pt").relative_to(path)
        try:  # tensors and plain data only: a crafted file cannot run code here
            state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise TrainingError(f"checkpoint {path}: {name} holds objects other than tensors and plain "
                                "data (written before cocomix stored RNG states as tensors, or not by cocomix); "
                                "refusing to unpickle it: start a new run folder or set train.resume=never") from None
        if state["tokens_per_step"] != trainer.tokens_per_step:
            raise TrainingError(
                f"checkpoint {path}: tokens per step {state['tokens_per_step']} differs from the config's "
                f"{trainer.tokens_per_step}; resume with the same batch settings or start a new run folder"
            )
        weights = load_file(str(path / "model.safetensors"), device=str(trainer.device))
        missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
        # Tied weights are stored once; anything else missing means the checkpoint does not fit.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {path}: does not match the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        trainer.model.tie_weights()
        trainer.optimizer.load_state_dict(self.optimizer_state(path, state, folder))
        trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
        trainer.data_position = state["data_position"]
        self.restore_rngs(trainer, path, state["rng"] if isinstance(state["rng"], list) else [state["rng"]])

    @staticmethod
    def optimizer_state(path: Path, state: dict, folder: Path | None = None) -> dict:
        """The optimizer state of checkpoint `path`, from `folder` (where its trainer_state.pt is)."""
        folder = path if folder is None else folder
        if "optimizer" in state:  # checkpoints written before optimizer.pt
            return state["optimizer"]
        name = (folder / "optimizer.pt").relative_to(path)
        if not (folder / "optimizer.pt").exists():
            raise TrainingError(f"checkpoint {path}: has no {name} (only the newest checkpoint.keep_optimizer "
                                "checkpoints keep the optimizer state); resume from a newer one or start a new run folder")
        try:  # mmap: each process maps the file instead of reading a private copy of it
            return torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise TrainingError(f"checkpoint {path}: {name} holds objects other than tensors and plain data; "
                                "refusing to unpickle it") from None

    @staticmethod
    def restore_rngs(trainer, path: Path, rngs: list[dict]) -> None:
        """Each process's RNG states. A checkpoint written by another number of processes resumes too:
        processes it has states for take theirs, the others fresh streams seeded by (seed, step, rank),
        and the run continues, not bit for bit (different dropout masks than one uninterrupted run)."""
        d = trainer.dist
        if len(rngs) != d.world_size and d.is_main:
            print(f"{path}: written by {len(rngs)} process(es), resumed on {d.world_size}: continuing, but not "
                  "bit-exact (exact resume needs the same world size)", flush=True)
        if d.rank < len(rngs):
            set_rng_state(rngs[d.rank])
        else:
            seed_rngs((trainer.cfg.seed * 1_000_003 + trainer.step) * 1_009 + d.rank)

    # ---- save ----

    def save(self, trainer) -> Path:
        final = trainer.run_dir / "checkpoints" / f"step_{trainer.step:07d}"
        rngs = [rng_state()]  # every process contributes its RNG state (dropout masks differ per rank)
        if trainer.dist.world_size > 1:
            gathered: list = [None] * trainer.dist.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if trainer.dist.is_main and not final.exists():
            tmp = final.with_name(final.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.model.save_pretrained(tmp)
            point("checkpoint.model.safetensors")
            shutil.copytree(trainer.cfg.data_dir / "tokenizer", tmp, dirs_exist_ok=True)
            from cocomix.data.tokenizer import set_model_max_length  # lazy: only a save needs it

            set_model_max_length(tmp, trainer.model.config.n_positions)  # the data's tokenizer says 1e30
            state_dir = tmp / self.TRAINER_DIR
            state_dir.mkdir()
            torch.save({"step": trainer.step, "tokens_seen": trainer.tokens_seen,
                        "data_position": trainer.data_position, "tokens_per_step": trainer.tokens_per_step,
                        "rng": rngs}, state_dir / "trainer_state.pt")
            point("checkpoint.trainer_state.pt")
            torch.save(trainer.optimizer.state_dict(), state_dir / "optimizer.pt")
            point("checkpoint.optimizer.pt")
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                     for name in self.VERIFIED}
            (tmp / "checkpoint.json").write_text(json.dumps(
                {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "method": trainer.method.name,
                 "config_fingerprint": self.fingerprint, "files": files,
                 "metrics_jsonl": MetricsLog(trainer.run_dir / "metrics.jsonl").prefix()}))
            point("checkpoint.checkpoint.json")
            follow_umask(tmp)  # safetensors writes 0600: colleagues could not read the weights
            os.replace(tmp, final)
            point("checkpoint.renamed")
            self.prune(trainer)
        barrier(trainer.dist)
        self.last_saved = final
        return final

    def prune(self, trainer) -> None:
        """After a new checkpoint is complete: drop checkpoints beyond keep_last, and the optimizer
        state of those beyond keep_optimizer (a kill in between leaves only extra files)."""
        keep, keep_opt = trainer.cfg.checkpoint.keep_last, trainer.cfg.checkpoint.keep_optimizer
        ckpts = list_checkpoints(trainer.run_dir)
        if keep > 0:
            for old in ckpts[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        if keep_opt > 0:
            for old in ckpts[:-keep_opt]:
                (old / self.TRAINER_DIR / "optimizer.pt").unlink(missing_ok=True)
                (old / "optimizer.pt").unlink(missing_ok=True)  # checkpoints written before trainer/
