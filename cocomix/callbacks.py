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
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from cocomix import checkpoints as ckpt
from cocomix import parallel
from cocomix.config import dump_config
from cocomix.device import all_reduce_mean, barrier, gpu_utilization, sync
from cocomix.files import atomic_write_json
from cocomix.progress import Reporter, si
from cocomix.records import MetricsLog, environment_info
from cocomix.tracking import Tracker, open_tracker


class TrainingError(RuntimeError):
    """A run that cannot continue (diverged, incompatible checkpoint); one-line message."""


class Terminated(KeyboardInterrupt):
    """A stop signal reached training: SIGTERM or SIGUSR1 (a scheduler's warning before preemption or the
    time limit: the SLURM profile sends SIGUSR1), or SIGINT (Ctrl-C). The loop finished its step and wrote
    a checkpoint; the run ends as an interrupt does, its tracked run marked KILLED, exit status 128 + the
    signal (143, 138, 130), which the profile resubmits; the next start resumes from that checkpoint."""

    def __init__(self, signum: int = 15, step: int | None = None, checkpoint: Path | None = None):
        super().__init__()
        name = signal.Signals(signum).name
        self.signum, self.exit_code = signum, 128 + signum
        saved = f"checkpoint {checkpoint.name} written" if checkpoint is not None else "no checkpoint written"
        self.message = (f"cocomix: stopped by {name}" + (f" after step {step}: {saved}" if step is not None else "")
                        + "; the run is marked KILLED and resumes from its newest checkpoint")


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
        self.utils: list[float] = []  # GPU utilisation at each log step (NVML)

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
        util = gpu_utilization(trainer.device)  # None on a CPU or without nvidia-ml-py: no key
        if util is not None:
            record["train/gpu_util"] = util
            self.utils.append(util)
        self._open_window(trainer)

    @staticmethod
    def mfu(trainer, tokens_per_s: float) -> float:
        return tokens_per_s * trainer.flops_per_token / (trainer.peak_flops * trainer.dist.world_size)

    def on_end(self, trainer, final) -> None:
        final["tokens_per_s"] = self.total_tokens / self.total_s if self.total_s else None
        final["mfu"] = self.mfu(trainer, final["tokens_per_s"]) if trainer.peak_flops and self.total_s else None
        final["peak_memory_gib"] = peak_memory_gib(trainer.device)
        final["gpu_util"] = sum(self.utils) / len(self.utils) if self.utils else None  # mean over log steps


def peak_memory_gib(device) -> float:
    """This process's peak memory: the CUDA allocator's peak on a GPU, the peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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


def run_role(cfg) -> str:
    """The `role` tag of a training run, so that one filter (tags.role = 'student') shows the students
    alone: sweep-trial (a sweep's or `cocomix tune`'s trial), teacher (the DAG's teacher run), ablation,
    arm (a compute-matched NTP arm, `dag.compute_matched`) or student."""
    tags = cfg.tracking.tags
    if "optuna.trial" in tags:
        return "sweep-trial"
    if cfg.resolved_run_name == "teacher":
        return "teacher"
    if tags.get("ablation", "none") != "none":
        return "ablation"
    return "arm" if "matches" in tags else "student"


class Tracking(Callback):
    """The run's record: config.yaml and environment.json in the run folder, metrics.jsonl, and the
    tracker's run (`tracking.backend`: params, tags, metrics at step = tokens seen,
    final_metrics.json as an artifact)."""

    def __init__(self):
        self.tracker: Tracker | None = None

    def on_start(self, trainer) -> None:
        if not trainer.dist.is_main:
            return
        cfg, env = trainer.cfg, environment_info()
        dump_config(cfg, trainer.run_dir / "config.yaml")
        atomic_write_json(trainer.run_dir / "environment.json", env)
        tags = {"experiment": cfg.experiment, "method": trainer.method.name, "scale": cfg.scale or "base",
                "seed": str(cfg.seed), "git_commit": env["git_commit"], "device": env["device"],
                "world_size": str(trainer.dist.world_size), "ablation": "none",  # plan.py tags ablations
                "role": run_role(cfg)}
        self.tracker = open_tracker(cfg, trainer.run_dir, tags, source="cocomix train",
                                    params={f"accounting.{k}": v for k, v in trainer.accounting.items()})
        self._truncate_log(trainer)
        self.tracker.catch_up()  # an earlier start ran without the backend: send what it lacks
        if trainer.resumed_from is None:
            self.tracker.log_artifact(trainer.run_dir / "config.yaml")
            self.tracker.log_artifact(trainer.run_dir / "environment.json")

    def _truncate_log(self, trainer) -> None:
        """metrics.jsonl as it was at the checkpoint resumed from (from scratch: empty)."""
        log, resumed = self.tracker.metrics, trainer.resumed_from
        if resumed is None:
            log.truncate_to({"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}, trainer.run_dir)
            return
        prefix = ckpt.read_meta(resumed).get("metrics_jsonl")
        if prefix is not None and ckpt.belongs_to(resumed, trainer.run_dir):  # not a checkpoint of another run
            log.truncate_to(prefix, resumed)
        else:
            log.truncate_after(trainer.tokens_seen)

    def on_step(self, trainer, step, record) -> None:
        if record and self.tracker is not None:
            self.tracker.log({"step": trainer.step, "tokens_seen": trainer.tokens_seen, **record})

    def on_end(self, trainer, final) -> None:
        final.update(self.tracker.ids() if self.tracker else {})

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
# Checkpoints: when to save and prune, and the resume call (the format: cocomix/checkpoints.py)
# --------------------------------------------------------------------------------------


class Checkpointer(Callback):
    """A checkpoint (cocomix/checkpoints.py) every `checkpoint.every_tokens` and at the end. Only the
    newest `checkpoint.keep_last` are kept, and only the newest `checkpoint.keep_optimizer` keep their
    optimizer state (resuming reads the newest; evaluation never reads it)."""

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
                ckpt.clear_litter(trainer.run_dir)
            path = self.newest_intact(trainer)
            if path is None:
                return None
        else:
            path = Path(resume)
            if ckpt.trainer_folder(path) is None:
                raise TrainingError(f"train.resume: '{path}' is not a checkpoint (no trainer/trainer_state.pt)")
            problem = ckpt.damage(path)
            if problem:
                raise TrainingError(f"train.resume: checkpoint {path} is damaged: {problem}")
        try:
            self.load(trainer, path)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        self.last_saved = path
        return path

    @staticmethod
    def newest_intact(trainer) -> Path | None:
        """The newest checkpoint that verifies (damaged newer ones are moved aside); one process
        hashes (gigabytes at scale), the others are told the result."""
        found = [None]
        if trainer.dist.is_main:
            path = ckpt.newest_intact(trainer.run_dir)
            found[0] = str(path) if path else None
        if trainer.dist.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def supersede_stale_run(self, trainer) -> None:
        """A run folder whose checkpoints came from another config is moved aside, not resumed:
        resuming it would silently mix two experiments (e.g. after a DAG rerun for a changed lr)."""
        found = ckpt.newest_fingerprint(trainer.run_dir)
        if found is None or found == self.fingerprint:
            return
        barrier(trainer.dist)
        if trainer.dist.is_main:
            old = ckpt.supersede(trainer.run_dir)
            # Its tracked run, if its process died (SIGKILL), would stay RUNNING for ever: ended KILLED.
            if (old / "config.yaml").is_file():
                open_tracker(ckpt.run_config(old), old, create=False, resume_status=False).end_if_running()
        barrier(trainer.dist)

    def load(self, trainer, path: Path) -> None:
        state, folder = ckpt.load_trainer_state(path)
        if state["tokens_per_step"] != trainer.tokens_per_step:
            raise TrainingError(
                f"checkpoint {path}: tokens per step {state['tokens_per_step']} differs from the config's "
                f"{trainer.tokens_per_step}; resume with the same batch settings or start a new run folder"
            )
        sharded = parallel.is_sharded(trainer.model)  # FSDP: full tensors on the CPU, each process keeps its shards
        weights = ckpt.load_weights(path, "cpu" if sharded else trainer.device)
        own = trainer.model.state_dict()
        differ = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                  if k in own and v.shape != own[k].shape]
        if differ:  # load_state_dict would raise one "size mismatch" line per tensor
            raise TrainingError(f"checkpoint {path}: a model of another shape ({len(differ)} tensors differ, first: "
                                f"{'; '.join(differ[:2])}; checkpoint vs this config); resume with the config it "
                                "was trained with, or start a new run folder")
        missing, unexpected = parallel.load_weights(trainer.model, weights)
        # Tied weights are stored once; anything else missing means the checkpoint does not fit.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {path}: does not match the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        if not sharded:  # a sharded model's head is its embedding's parameter already
            trainer.model.tie_weights()
        shards = folder / ckpt.OPTIMIZER_SHARDS
        parallel.load_optimizer(trainer.model, trainer.optimizer, shards if shards.is_dir() else None,
                                None if shards.is_dir() else ckpt.optimizer_state(path, state, folder))
        trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
        trainer.data_position = state["data_position"]
        self.restore_rngs(trainer, path, state["rng"] if isinstance(state["rng"], list) else [state["rng"]])

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
            ckpt.set_rng_state(rngs[d.rank])
        else:
            ckpt.seed_rngs((trainer.cfg.seed * 1_000_003 + trainer.step) * 1_009 + d.rank)

    # ---- save ----

    def save(self, trainer) -> Path:
        final = ckpt.step_path(trainer.run_dir, trainer.step)
        rngs = [ckpt.rng_state()]  # every process contributes its RNG state (dropout masks differ per rank)
        if trainer.dist.world_size > 1:
            gathered: list = [None] * trainer.dist.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if trainer.cfg.train.parallel == "fsdp":
            return self.save_sharded(trainer, final, rngs)
        if trainer.dist.is_main and not final.exists():
            ckpt.write(final, trainer.model, trainer.data_dir / "tokenizer", self.trainer_state(trainer, rngs),
                       trainer.optimizer.state_dict(), self.meta(trainer))
            c = trainer.cfg.checkpoint
            ckpt.prune(trainer.run_dir, c.keep_last, c.keep_optimizer)
        barrier(trainer.dist)
        self.last_saved = final
        return final

    @staticmethod
    def trainer_state(trainer, rngs: list) -> dict:
        return {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "data_position": trainer.data_position,
                "tokens_per_step": trainer.tokens_per_step, "rng": rngs}

    def meta(self, trainer) -> dict:
        return {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "method": trainer.method.name,
                "config_fingerprint": self.fingerprint,
                "metrics_jsonl": MetricsLog(trainer.run_dir / "metrics.jsonl").prefix()}

    def save_sharded(self, trainer, final: Path, rngs: list) -> Path:
        """train.parallel=fsdp: the full weights gathered to rank 0 (model.safetensors, as under DDP) and
        the optimizer state as a torch.distributed.checkpoint folder that every process writes its shards
        of, into the temporary folder rank 0 names; rank 0 then completes, seals and renames it."""
        weights = parallel.full_weights(trainer.model)  # a collective: every process, every time
        todo = [None if final.exists() else str(ckpt.temporary(final))] if trainer.dist.is_main else [None]
        if trainer.dist.world_size > 1:  # rank 0's answer: the folder to write in, None when already saved
            dist.broadcast_object_list(todo, src=0)
        if todo[0] is not None:
            tmp_path = Path(todo[0])
            if trainer.dist.is_main:
                ckpt.clear_temporary(tmp_path)
            barrier(trainer.dist)
            try:
                parallel.save_optimizer(trainer.model, trainer.optimizer,
                                        tmp_path / ckpt.TRAINER_DIR / ckpt.OPTIMIZER_SHARDS)
            except BaseException:
                if trainer.dist.is_main:
                    ckpt.clear_temporary(tmp_path)
                raise
            if trainer.dist.is_main:
                writer = trainer.model if weights is None else parallel.empty_twin(trainer.model)
                ckpt.write(final, writer, trainer.data_dir / "tokenizer", self.trainer_state(trainer, rngs), None,
                           self.meta(trainer), weights=weights)
                c = trainer.cfg.checkpoint
                ckpt.prune(trainer.run_dir, c.keep_last, c.keep_optimizer)
        barrier(trainer.dist)
        self.last_saved = final
        return final
