"""The one trainer every method shares.

The loop is boring on purpose: take the next `global_batch_size` blocks of the seeded data order,
run one training step (`train_step`: the method's loss over this process's micro-batches, backward,
clipping, AdamW), and let small components (`cocomix/callbacks.py`: NaN guard, progress, throughput,
evaluation, tracking, checkpoints, sweep pruning) act on token-budget boundaries.

Exactness: the data order depends only on (data_seed, position), the learning rate only on the
step, and checkpoints hold model, optimizer, data position and every RNG state. A run killed at any
point and resumed from its latest checkpoint therefore reproduces the uninterrupted run bit for bit
on the same hardware. The global batch is split over processes and accumulation steps, so results
do not depend on the number of processes.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cocomix import parallel
from cocomix.callbacks import (Callback, Checkpointer, EarlyStop, Evaluator, NaNGuard, OnEval, Progress, Terminated,
                               Tracking, TrainingError, TrainMetrics)
from cocomix.config import MAX_EPOCHS, Config, ConfigError, split_batch
from cocomix.data import DataError
from cocomix.data.shards import BlockOrder, BlockRange, TokenBlocks, check_tokenizer_matches, load_manifest
from cocomix.device import (Dist, autocast, available_memory, estimate_training_memory, gib, peak_flops,
                            setup_distributed, sync, use_bf16)
from cocomix.diagnostics import readout_diagnostics
from cocomix.faults import point
from cocomix.checkpoints import list_checkpoints, step_path
from cocomix.files import RunInUse, atomic_write_json, lock_run
from cocomix.methods import Batch, Method, get_method, run_fingerprint
from cocomix.model import token_nll
from cocomix.params import count_params, ntp_params
from cocomix.teacher import init_from

__all__ = ["EarlyStop", "StepResult", "Trainer", "TrainingError", "list_checkpoints", "lr_at", "peak_flops", "train"]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine to `peak * min_ratio` at `total_steps` (spec section 2)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class StepResult:
    """What one optimizer step measured (the callbacks' input). Tensors stay on the device: reading
    one (`.item()`) waits for the GPU, so callbacks do it only at log steps."""

    loss: torch.Tensor              # this process's mean loss over its micro-batches (0-dim)
    lr: float
    grad_norm: torch.Tensor | None  # before clipping (None until the gradients are clipped)
    parts: dict[str, torch.Tensor]  # the method's named loss parts, this process's mean


def train_step(model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer, micro: list[Batch], *,
               lr: float, grad_clip: float, autocast=nullcontext(), train_model: torch.nn.Module | None = None,
               dist: Dist = Dist(), before_update: Callable[[StepResult], None] | None = None) -> StepResult:
    """The training step every run and benchmark executes: the method's loss over the micro-batches
    (gradient accumulation; under DDP gradients synchronise on the last one only), backward,
    `before_update` (the NaN guard), gradient clipping at `grad_clip` (0: none), AdamW at `lr`.
    `train_model` is what runs the forward (DDP- or compile-wrapped `model`); `model` owns the weights.
    Nothing in the step reads a value back from the device."""
    train_model = model if train_model is None else train_model  # not `or`: a compiled module has no truth value
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    parts_sum: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        batch = batch.to(loss_sum.device)
        with parallel.gradient_sync(model, train_model, dist, last=i == len(micro) - 1):
            with autocast:
                loss, parts = method.loss(train_model, batch)
            (loss / len(micro)).backward()
        loss_sum += loss.detach().float() / len(micro)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.float() / len(micro)
    result = StepResult(loss_sum, lr, None, parts_sum)  # no host sync: nothing here waits for the GPU
    if before_update is not None:
        before_update(result)
    result.grad_norm = parallel.local_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def tuning_split(train: TokenBlocks, n: int) -> tuple[BlockRange, BlockRange]:
    """(training blocks, tuning blocks) of `eval.split: tune`: the last `n` blocks of the training split
    are the tuning split; the block before them is left out too (a gap), the rest is trained on."""
    if n > len(train) // 4:
        raise ConfigError(f"config key 'eval.tune_blocks': a tuning split of {n} blocks is more than a quarter of "
                          f"the {len(train)} training blocks of {train.data_dir}; expected at most {len(train) // 4}")
    return BlockRange(train, 0, len(train) - n - 1), BlockRange(train, len(train) - n, len(train))


class Trainer:
    def __init__(self, cfg: Config, method: Method | None = None, progress: bool = True,
                 on_eval: Callable[[int, dict[str, float]], None] | None = None,
                 callbacks: list[Callback] | None = None):
        """`on_eval(tokens_seen, val_metrics)` is called after each held-out evaluation (once the
        point is logged and any checkpoint saved); it may raise `EarlyStop`. `callbacks` run after
        the default components."""
        self.cfg = cfg
        self.method = method or get_method(cfg.method)
        # What the run reads of its config's derived values, read once (the config is not re-entered).
        self.fingerprint = run_fingerprint(cfg, self.method)
        self.run_dir, self.data_dir = cfg.run_dir, cfg.data_dir
        self.dist, self.device = setup_distributed()
        self._build_data()
        self._build_model()
        self.method.setup(self)
        counts = count_params(self.model)  # total and active parameters (spec 1.7), FLOPs per token
        self.accounting = {"params": counts.total, "active_params": counts.active,
                           "flops_per_token": self.flops_per_token,
                           "teacher_flops_per_token": self.method.teacher_flops_per_token(),
                           "tokens_per_step": self.tokens_per_step}  # step = tokens seen / tokens_per_step
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = None  # one writer per run folder: a second process stops here, naming the holder
        if self.dist.is_main:
            try:
                self.run_lock = lock_run(self.run_dir)
            except RunInUse as e:
                raise TrainingError(str(e)) from None
        self.checkpointer = Checkpointer(self.fingerprint)
        self.resumed_from = self.checkpointer.resume(self)
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        # The prediction-only ablation leaves parameters without gradients (its compression, and with
        # concept.lam=0 its whole head): DDP must search for them, at a cost only that run pays.
        unused = self.model.slot is not None and not self.model.slot.all_params_reach_stream
        self.train_model = parallel.wrap_ddp(self.train_model, self.dist, self.device, unused)  # fsdp: as it is
        self.last_val: dict[str, float] = {}
        self.untimed_s = 0.0  # seconds of evaluation and checkpointing so far (see `untimed`)
        self.callbacks = self.default_callbacks(progress, on_eval) + list(callbacks or [])

    @property
    def data_seed(self) -> int:
        """The seed of this run's data order: `train.data_seed`, or the run's seed when that is null."""
        return self.cfg.train.data_seed if self.cfg.train.data_seed is not None else self.cfg.seed

    def _build_data(self) -> None:
        t, data_dir = self.cfg.train, self.data_dir
        # sha256 of every shard on the main process; sizes only elsewhere (same files).
        splits = ("train",) if self.cfg.eval.split == "tune" else None  # tuning: the validation split is never read
        self.manifest = load_manifest(data_dir, verify=True if self.dist.is_main else "size", splits=splits)
        self.train_blocks = TokenBlocks(data_dir, "train", t.block_size, verify=False)  # verified just above
        if self.cfg.eval.split == "tune":  # never opens the validation split
            self.train_blocks, self.val_blocks = tuning_split(self.train_blocks, self.cfg.eval.tune_blocks)
        else:
            self.val_blocks = TokenBlocks(data_dir, "val", t.block_size, verify=False)
        for split, blocks in (("train", self.train_blocks), ("val", self.val_blocks)):
            if len(blocks) == 0:
                raise DataError(f"{data_dir}: the {split} split has fewer tokens than one block of {t.block_size}")
        self.order = BlockOrder(len(self.train_blocks), self.data_seed)
        self.micro_batch_size, self.accum_steps = split_batch(t.global_batch_size, t.micro_batch_size,
                                                              self.dist.world_size)
        self.tokens_per_step = t.global_batch_size * t.block_size
        self.total_steps = t.tokens // self.tokens_per_step
        split = len(self.train_blocks) * t.block_size
        if self.total_steps * self.tokens_per_step > MAX_EPOCHS * split and not t.allow_repeat:
            raise ConfigError(f"config key 'train.tokens': {t.tokens:,} tokens are "
                              f"{self.total_steps * self.tokens_per_step / split:,.0f} passes over the training split "
                              f"({split:,} tokens in {data_dir}); more than {MAX_EPOCHS} needs train.allow_repeat=true")
        self.warmup_steps = t.warmup_for(self.total_steps * self.tokens_per_step)
        self.step = self.tokens_seen = self.data_position = 0
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="cocomix-data")
        self._prefetch = None  # (data position, future of its micro-batches)

    def _check_memory(self) -> None:
        """Refuse, before anything is allocated, a model and micro-batch that cannot fit this device's
        free memory (a lower bound of the need, `MemoryEstimate`); `train.memory_check=false` skips it."""
        t, m = self.cfg.train, self.cfg.model
        if not t.memory_check:
            return
        vocab = m.vocab_size or self.manifest["vocab_size"]
        vocab = -(-vocab // m.vocab_multiple) * m.vocab_multiple
        params = ntp_params(m.n_embd, m.n_layer, vocab, m.n_positions or t.block_size)
        est = estimate_training_memory(params, m.n_embd, m.n_layer, vocab, t.block_size,
                                       use_bf16(self.device, t.precision),
                                       shards=self.dist.world_size if t.parallel == "fsdp" else 1,
                                       recompute=t.activation_checkpointing)
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
        free = available_memory(self.device, here)
        if free == 0 or est.need(self.micro_batch_size) <= free:
            return
        fits = est.largest_micro_batch(free, t.global_batch_size // self.dist.world_size)
        advice = (f"the largest micro-batch that fits is {fits} (train.micro_batch_size={fits})" if fits else
                  "no micro-batch fits: a smaller model (model.n_embd, model.n_layer) or more devices")
        where = f"{self.device.type} (free memory of this process's GPU)" if self.device.type == "cuda" else \
            "this host's available RAM" + (f" shared by {here} processes" if here > 1 else "")
        raise ConfigError(
            f"config key '{'train.micro_batch_size' if fits else 'model.n_embd'}': training needs at least {gib(est.need(self.micro_batch_size))} "
            f"({gib(est.fixed)} for the weights, gradients and AdamW state of {params / 1e9:,.2f}B parameters, "
            f"{gib(self.micro_batch_size * est.per_sequence)} of activations for micro-batch {self.micro_batch_size}) "
            f"but {where} is {gib(free)}; {advice}; train.memory_check=false to try anyway")

    def _build_model(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self._check_memory()
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = self.method.build_model(cfg, self.manifest["vocab_size"], self.manifest["eos_id"]).to(self.device)
        if cfg.model.init_from:  # continued pretraining: its weights (a resume then loads the run's own)
            got = init_from(self.model, cfg.model.init_from)
            if self.dist.is_main:
                print(f"model.init_from {cfg.model.init_from}: {len(got['loaded'])} tensors loaded, "
                      f"{len(got['kept'])} freshly initialised, {len(got['unused'])} of the checkpoint unused", flush=True)
        # The configured tokenizer (if any) must be the one the shards were made with, and every
        # token id in the shards must fit the model's embedding table.
        check_tokenizer_matches(self.data_dir, cfg.tokenizer.path or self.data_dir / "tokenizer",
                                self.model.config.real_vocab_size)  # padding rows are never a token
        # FSDP shards the model here, before the optimizer is built over its (sharded) parameters.
        parallel.prepare(self.model, t.parallel, t.activation_checkpointing, use_bf16(self.device, t.precision), self.dist)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),  # one group: decay on all parameters, as the official code
            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
            fused=self.device.type == "cuda")
        self.autocast = autocast(self.device, t.precision)
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = self.model.flops_per_token(t.block_size)

    def default_callbacks(self, progress: bool, on_eval=None) -> list[Callback]:
        """In the order they act after each step: metrics are gathered, logged, then checkpointed."""
        callbacks = [NaNGuard(), TrainMetrics(), Progress(progress), Evaluator(), Tracking(), self.checkpointer]
        return callbacks + ([OnEval(on_eval)] if on_eval is not None else [])

    def _before_update(self, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.before_optimizer_step(self, result)

    @contextmanager
    def untimed(self):
        """Work that throughput must not count (evaluation, checkpoints): its wall time, measured
        after the queued training work finished, is added to `untimed_s`."""
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.untimed_s += time.perf_counter() - start

    def save_checkpoint(self):
        """Save a checkpoint of the current state now (the Checkpointer does it on schedule)."""
        return self.checkpointer.save(self)

    # ---------------- the step ----------------

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def crossed(self, every: int) -> bool:
        """True when the last step crossed a multiple of `every` tokens."""
        return self.tokens_seen // every > (self.tokens_seen - self.tokens_per_step) // every

    def next_micro_batches(self) -> list[Batch]:
        """This process's share of the next global batch, in fixed order. Assembled in a background
        thread while the previous step ran (pinned memory on CUDA, so the copy overlaps compute)."""
        position, step = self.data_position, self.cfg.train.global_batch_size
        pending = self._prefetch
        micro = pending[1].result() if pending is not None and pending[0] == position else self.micro_batches_at(position)
        if self.step + 1 < self.total_steps:
            self._prefetch = (position + step, self._loader.submit(self.micro_batches_at, position + step))
        return micro

    def micro_batches_at(self, position: int) -> list[Batch]:
        """This process's share of the global batch that starts at `position` of the data order."""
        t = self.cfg.train
        indices = self.order.take(position, t.global_batch_size)
        per_rank = t.global_batch_size // self.dist.world_size
        mine = indices[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        m = self.micro_batch_size
        blocks = self.train_blocks
        batches = [Batch(blocks.get_batch(idx), self.method.extras(blocks.split, blocks.offset + idx))
                   for idx in (mine[i : i + m] for i in range(0, per_rank, m))]
        return [b.pin_memory() for b in batches] if self.device.type == "cuda" else batches

    def train_step(self, micro: list[Batch]) -> StepResult:
        """One optimizer step over `micro` (this process's micro-batches of one global batch)."""
        t = self.cfg.train
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, t.lr, t.min_lr_ratio)
        result = train_step(self.model, self.method, self.optimizer, micro, lr=lr, grad_clip=t.grad_clip,
                            autocast=self.autocast, train_model=self.train_model, dist=self.dist,
                            before_update=self._before_update)
        self.step += 1
        self.data_position += t.global_batch_size
        self.tokens_seen += self.tokens_per_step
        return result

    # ---------------- evaluation ----------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean over validation blocks of the per-block mean next-token loss (spec section 5)."""
        ev = self.cfg.eval
        n = len(self.val_blocks) if ev.max_blocks is None else min(ev.max_blocks, len(self.val_blocks))
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        # Under FSDP every forward is a collective: each process runs as many as the busiest one (an
        # idle one forwards block 0 and counts nothing).
        passes = math.ceil(math.ceil(n / self.dist.world_size) / ev.batch_size) if parallel.is_sharded(self.model) else None
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}  # metric -> sum over blocks (float64)
        blocks = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, ev.batch_size * passes if passes is not None else len(mine), ev.batch_size):
            idx, weight = mine[i : i + ev.batch_size], 1.0
            if len(idx) == 0:
                idx, weight = np.zeros(1, dtype=np.int64), 0.0
            val = self.val_blocks  # the validation split, or the tuning split (blocks of the training split)
            batch = Batch(val.get_batch(idx), self.method.extras(val.split, val.offset + idx)).to(self.device)
            with self.autocast:
                logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
            per_block = {"loss": token_nll(logits, batch.input_ids).mean(dim=1),
                         **self.method.eval_metrics(self.model, batch, logits)}
            if ev.diagnostics:  # interleaving models: what the read-out slot does (cocomix/diagnostics.py)
                with self.autocast:
                    per_block.update(readout_diagnostics(self.model, batch.input_ids))
            for k, v in per_block.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v.double().sum() * weight
            blocks += batch.input_ids.size(0) * weight
        self.model.train()
        names = sorted(sums)
        total = torch.stack([sums[k] for k in names] + [blocks])
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        out = {f"val/{k}": (total[j] / total[-1]).item() for j, k in enumerate(names)}
        out["val/ppl"] = math.exp(min(out["val/loss"], 50.0))
        return out

    def compute_ledger(self) -> dict:
        """What the run cost, apart (cocomix/flops.py): `compute/student_flops` (training FLOPs of the
        student over the tokens seen), `compute/online_teacher_flops` (KD's teacher, online labels),
        and the one-off items the run shares with its experiment (`compute/teacher_training_flops`,
        `compute/sae_training_flops`, `compute/label_extraction_flops`; null when not counted), with
        `compute_notes` saying how each was counted."""
        ledger = {"compute/student_flops": float(self.flops_per_token * self.tokens_seen),
                  "compute/online_teacher_flops": float(self.accounting["teacher_flops_per_token"] * self.tokens_seen)}
        notes = {}
        for item, (flops, how) in self.method.one_off_flops().items():
            ledger[f"compute/{item}_flops"] = flops
            notes[item] = how
        return {**ledger, "compute_notes": notes}

    # ---------------- the loop ----------------

    def train(self) -> dict[str, float]:
        """Steps until the token budget is spent; returns (and writes) final_metrics.json. An interrupt
        (SIGINT) or SIGTERM ends the run KILLED, an error FAILED: the tracked status never says RUNNING
        for a process that is gone (SIGKILL aside: the next start of the folder continues its run)."""
        for cb in self.callbacks:
            cb.on_start(self)
        self.model.train()
        status = "FAILED"
        stop = StopRequest()
        try:
            while not self.finished:
                result = self.train_step(self.next_micro_batches())
                point("train.step")
                record: dict[str, float] = {}
                for cb in self.callbacks:
                    cb.on_step(self, result, record)
                signum = stop.agreed(self) if not self.finished else None
                if signum:  # a stop signal: this step's checkpoint, then the run ends KILLED
                    last = self.checkpointer.last_saved
                    if last is None or last.name != step_path(self.run_dir, self.step).name:
                        with self.untimed():
                            last = self.save_checkpoint()
                    raise Terminated(signum, self.step, last)
            final = {"step": self.step, "tokens_seen": self.tokens_seen, "eval_split": self.cfg.eval.split,
                     **(self.last_val or self.evaluate()),  # resumed from the final checkpoint: evaluate it
                     "checkpoint": str(list_checkpoints(self.run_dir)[-1]) if self.dist.is_main else "",
                     **self.accounting, **self.compute_ledger()}
            for cb in self.callbacks:
                cb.on_end(self, final)
            if self.dist.is_main:
                atomic_write_json(self.run_dir / "final_metrics.json", final)
            status = "FINISHED"
            return final
        except (EarlyStop, KeyboardInterrupt):  # Terminated is a KeyboardInterrupt
            status = "KILLED"
            raise
        finally:
            stop.restore()
            self._loader.shutdown(wait=True, cancel_futures=True)
            for cb in self.callbacks:
                cb.on_finish(self, status)
            if self.run_lock is not None:
                self.run_lock.close()  # the next writer may start


class StopRequest:
    """SIGTERM, SIGUSR1 and SIGINT set a flag that the loop reads after each step, so a step is never cut
    in half and the stop can be checkpointed; a second SIGINT stops at once (KeyboardInterrupt). Every
    process must stop after the same step: under DDP the flag is agreed (all-reduced) at log steps, the
    steps whose metrics synchronise the host anyway. No handlers off the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt()  # Ctrl-C twice: at once
        self.signum = self.signum or signum

    def agreed(self, trainer) -> int:
        """The signal to stop for (0: go on), the same on every process."""
        if trainer.dist.world_size == 1:
            return self.signum
        if trainer.step % trainer.cfg.train.log_every_steps:
            return 0
        flag = torch.tensor([self.signum], device=trainer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg: Config, method: Method | None = None, progress: bool = True,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    return Trainer(cfg, method, progress, on_eval).train()
