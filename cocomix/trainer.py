"""The one trainer every method shares.

The loop is boring on purpose: take the next `global_batch_size` blocks of the seeded data order,
run the method's loss over this process's micro-batches, step AdamW, and let small components
(evaluation, checkpoints, tracking, throughput) act on token-budget boundaries.

Exactness: the data order depends only on (data_seed, position), the learning rate only on the
step, and checkpoints hold model, optimizer, data position and every RNG state. A run killed at any
point and resumed from its latest checkpoint therefore reproduces the uninterrupted run bit for bit
on the same hardware. The global batch is split over processes and accumulation steps, so results
do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cocomix.config import Config, dump_config
from cocomix.data import DataError
from cocomix.data.shards import BlockOrder, TokenBlocks, check_tokenizer_matches, load_manifest
from cocomix.methods import Batch, Method, get_method

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


class TrainingError(RuntimeError):
    """A run that cannot continue (diverged, incompatible checkpoint); one-line message."""


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine to `peak * min_ratio` at `total_steps` (spec section 2)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices get no MFU (and a warning) rather
# than a silently wrong number.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A6000": 155e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # CPUs report no MFU
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first ("H100 PCIe")
        if key in name:
            return PEAK_BF16_FLOPS[key]
    warnings.warn(f"unknown device {name!r}: no peak-FLOPs entry, MFU will not be reported", stacklevel=2)
    return None


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        index = d.local_rank
        if world == 1 and torch.cuda.device_count() > 1:
            from cocomix.gpus import claim_device

            index = claim_device(torch.cuda.device_count())  # concurrent DAG jobs: one GPU each
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    return d, device


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


class EarlyStop(Exception):
    """Raised by an `on_eval` callback to end a run early (a pruned sweep trial). The MLflow run is
    marked KILLED and no final_metrics.json is written."""


class Trainer:
    def __init__(self, cfg: Config, method: Method | None = None, progress: bool = True,
                 on_eval: Callable[[int, dict[str, float]], None] | None = None):
        """`on_eval(tokens_seen, val_metrics)` is called after each held-out evaluation (once the
        point is logged and any checkpoint saved); it may raise `EarlyStop`."""
        self.cfg = cfg
        self.method = method or get_method(cfg.method)
        self.progress = progress
        self.on_eval = on_eval
        self.dist, self.device = setup_distributed()
        self.run_dir = cfg.run_dir
        t = cfg.train

        # ---- data ----
        data_dir = cfg.data_dir
        # sha256 of every shard on the main process; sizes only elsewhere (same files).
        self.manifest = load_manifest(data_dir, verify=True if self.dist.is_main else "size")
        self.train_blocks = TokenBlocks(data_dir, "train", t.block_size, verify=False)  # verified just above
        self.val_blocks = TokenBlocks(data_dir, "val", t.block_size, verify=False)
        if len(self.train_blocks) == 0:
            raise DataError(f"{data_dir}: the train split has fewer tokens than one block of {t.block_size}")
        if len(self.val_blocks) == 0:
            raise DataError(f"{data_dir}: the val split has fewer tokens than one block of {t.block_size}")
        self.order = BlockOrder(len(self.train_blocks), t.data_seed)
        per_rank = t.global_batch_size // self.dist.world_size
        if t.global_batch_size % self.dist.world_size or per_rank % t.micro_batch_size:
            raise TrainingError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"world_size={self.dist.world_size} x train.micro_batch_size={t.micro_batch_size}"
            )
        self.accum_steps = per_rank // t.micro_batch_size
        self.tokens_per_step = t.global_batch_size * t.block_size
        self.total_steps = t.tokens // self.tokens_per_step
        self.warmup_steps = t.warmup_steps if t.warmup_steps is not None else max(1, self.total_steps // 300)

        # ---- model and optimizer ----
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = self.method.build_model(cfg, self.manifest["vocab_size"], self.manifest["eos_id"]).to(self.device)
        # The configured tokenizer (if any) must be the one the shards were made with, and every
        # token id in the shards must fit the model's embedding table.
        check_tokenizer_matches(data_dir, cfg.tokenizer.path or data_dir / "tokenizer", self.model.config.vocab_size)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),  # one group: decay on all parameters, as the official code
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.step = 0
        self.tokens_seen = 0
        self.data_position = 0
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = self.model.flops_per_token(t.block_size)
        self.method.setup(self)
        # What every run records (final_metrics.json, MLflow params): total and active parameters
        # (spec 1.7) and training FLOPs per token, the teacher's online cost apart (cocomix/flops.py).
        from cocomix.params import count_params

        counts = count_params(self.model)
        self.accounting = {
            "params": counts.total,
            "active_params": counts.active,
            "flops_per_token": self.flops_per_token,
            "teacher_flops_per_token": self.method.teacher_flops_per_token(),
        }

        self.run_dir.mkdir(parents=True, exist_ok=True)
        from cocomix.dag import fingerprint

        self.config_fingerprint = fingerprint(cfg, self.method)
        self.resumed_from = self._maybe_resume()
        self.train_model = self.model
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
        if self.dist.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None
            )
        self.tracker = None

    # ---------------- checkpoints ----------------

    def _supersede_stale_run(self) -> None:
        """A run folder whose checkpoints came from another config is moved aside, not resumed:
        resuming it would silently mix two experiments (e.g. after a DAG rerun for a changed lr)."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return
        meta = json.loads((ckpts[-1] / "checkpoint.json").read_text())
        if meta.get("config_fingerprint") == self.config_fingerprint:
            return
        self._barrier()
        if self.dist.is_main:
            n = 1 + sum(1 for p in self.run_dir.iterdir() if p.name.startswith("superseded-"))
            dest = self.run_dir / f"superseded-{n}"
            dest.mkdir()
            for name in ("checkpoints", "metrics.jsonl", "final_metrics.json", "mlflow_run_id", "config.yaml"):
                if (self.run_dir / name).exists():
                    os.replace(self.run_dir / name, dest / name)
            warnings.warn(f"{self.run_dir}: its checkpoints were made with another config; moved to {dest}, "
                          "starting over", stacklevel=2)
        self._barrier()

    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            self._supersede_stale_run()
            ckpts = list_checkpoints(self.run_dir)
            if not ckpts:
                return None
            path = ckpts[-1]
        else:
            path = Path(resume)
            if not (path / "trainer_state.pt").exists():
                raise TrainingError(f"train.resume: '{path}' is not a checkpoint (no trainer_state.pt)")
        self.load_checkpoint(path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state["tokens_per_step"] != self.tokens_per_step:
            raise TrainingError(
                f"checkpoint {path}: tokens per step {state['tokens_per_step']} differs from the config's "
                f"{self.tokens_per_step}; resume with the same batch settings or start a new run folder"
            )
        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        # Tied weights are stored once; anything else missing means the checkpoint does not fit.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.tie_weights()
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.data_position = state["data_position"]
        set_rng_state(state["rng"][self.dist.rank] if isinstance(state["rng"], list) else state["rng"])

    def save_checkpoint(self) -> Path:
        """Write step_<N>/ atomically: a temporary folder renamed into place when complete."""
        final = self.run_dir / "checkpoints" / f"step_{self.step:07d}"
        # Every process contributes its RNG state (dropout masks differ per rank).
        rngs = [rng_state()]
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.dist.is_main and not final.exists():
            tmp = final.with_name(final.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp)  # loadable by AutoModelForCausalLM as it stands
            shutil.copytree(self.cfg.data_dir / "tokenizer", tmp, dirs_exist_ok=True)
            torch.save(
                {
                    "step": self.step,
                    "tokens_seen": self.tokens_seen,
                    "data_position": self.data_position,
                    "tokens_per_step": self.tokens_per_step,
                    "optimizer": self.optimizer.state_dict(),
                    "rng": rngs,
                },
                tmp / "trainer_state.pt",
            )
            (tmp / "checkpoint.json").write_text(
                json.dumps({"step": self.step, "tokens_seen": self.tokens_seen, "method": self.method.name,
                            "config_fingerprint": self.config_fingerprint})
            )
            os.replace(tmp, final)
            self._prune_checkpoints()
        self._barrier()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep <= 0:
            return
        for old in list_checkpoints(self.run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    # ---------------- data ----------------

    def _micro_batches(self) -> list[Batch]:
        """This process's share of the next global batch, in fixed order."""
        t = self.cfg.train
        indices = self.order.take(self.data_position, t.global_batch_size)
        per_rank = t.global_batch_size // self.dist.world_size
        mine = indices[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        batches = []
        for i in range(0, per_rank, t.micro_batch_size):
            idx = mine[i : i + t.micro_batch_size]
            batches.append(Batch(self.train_blocks.get_batch(idx), self.method.extras("train", idx)))
        return batches

    # ---------------- evaluation ----------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean over validation blocks of the per-block mean next-token loss (spec section 5)."""
        ev = self.cfg.eval
        n = len(self.val_blocks) if ev.max_blocks is None else min(ev.max_blocks, len(self.val_blocks))
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}  # metric -> sum over blocks (float64)
        blocks = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(mine), ev.batch_size):
            idx = mine[i : i + ev.batch_size]
            batch = Batch(self.val_blocks.get_batch(idx), self.method.extras("val", idx)).to(self.device)
            ids = batch.input_ids
            with self.autocast:
                logits = self.model(input_ids=ids, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
            ).view(ids.size(0), -1)
            per_block = {"loss": nll.mean(dim=1), **self.method.eval_metrics(self.model, batch, logits)}
            for k, v in per_block.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v.double().sum()
            blocks += ids.size(0)
        self.model.train()
        names = sorted(sums)
        total = torch.stack([sums[k] for k in names] + [blocks])
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        out = {f"val/{k}": (total[j] / total[-1]).item() for j, k in enumerate(names)}
        out["val/ppl"] = math.exp(min(out["val/loss"], 50.0))
        return out

    # ---------------- the loop ----------------

    def _crossed(self, every: int) -> bool:
        """True when the last step crossed a multiple of `every` tokens."""
        return self.tokens_seen // every > (self.tokens_seen - self.tokens_per_step) // every

    def train(self) -> dict[str, float]:
        from cocomix.tracking import RunTracker, environment_info

        cfg, t = self.cfg, self.cfg.train
        env = environment_info()
        if self.dist.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "environment.json").write_text(json.dumps(env, indent=2))
            tags = {
                "experiment": cfg.experiment,
                "method": self.method.name,
                "scale": cfg.scale or "base",
                "seed": str(cfg.seed),
                "git_commit": env["git_commit"],
                "device": env["device"],
                "world_size": str(self.dist.world_size),
            }
            self.tracker = RunTracker(cfg, self.run_dir, tags)
            self.tracker.metrics.truncate_after(self.tokens_seen)
            if self.resumed_from is None:
                self.tracker.log_artifact(self.run_dir / "config.yaml")
                self.tracker.log_artifact(self.run_dir / "environment.json")
                if self.tracker.client is not None:
                    from mlflow.entities import Param

                    self.tracker.client.log_batch(
                        self.tracker.run_id, params=[Param(f"accounting.{k}", str(v)) for k, v in self.accounting.items()]
                    )

        if self.dist.is_main:
            where = f"resumed from {self.resumed_from}" if self.resumed_from else "starting from scratch"
            print(f"{cfg.resolved_run_name}: {where} (step {self.step}/{self.total_steps}, "
                  f"tokens {self.tokens_seen:,}/{self.total_steps * self.tokens_per_step:,})", flush=True)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.resolved_run_name}", unit="step")
        self.model.train()
        last_val: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        status = "FAILED"
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step, self.total_steps, self.warmup_steps, t.lr, t.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                micro = self._micro_batches()
                loss_sum = torch.zeros((), device=self.device)
                parts_sum: dict[str, torch.Tensor] = {}
                for i, batch in enumerate(micro):
                    batch = batch.to(self.device)
                    # Under DDP, synchronise gradients only on the last micro-batch.
                    sync = nullcontext()
                    if self.dist.world_size > 1 and i < len(micro) - 1:
                        sync = self.train_model.no_sync()
                    with sync:
                        with self.autocast:
                            loss, parts = self.method.loss(self.train_model, batch)
                        (loss / len(micro)).backward()
                    loss_sum += loss.detach().float() / len(micro)
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v.float() / len(micro)
                loss_val = all_reduce_mean(loss_sum, self.dist).item()
                if not math.isfinite(loss_val):
                    # Gradients are bad but the weights are still those of the last good step.
                    self.optimizer.zero_grad(set_to_none=True)
                    path = self.save_checkpoint()
                    raise TrainingError(
                        f"non-finite loss ({loss_val}) at step {self.step} (tokens {self.tokens_seen}); "
                        f"last good checkpoint: {path}"
                    )
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")
                )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.data_position += t.global_batch_size
                self.tokens_seen += self.tokens_per_step
                window_tokens += self.tokens_per_step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.3f}")

                last = self.step == self.total_steps
                record: dict[str, float] = {}
                if self.step % t.log_every_steps == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_tokens / max(elapsed, 1e-9)
                    record.update({"train/loss": loss_val, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                                   "train/tokens_per_s": tok_s})
                    for k, v in parts_sum.items():
                        record[f"train/{k}"] = all_reduce_mean(v, self.dist).item()
                    if self.peak_flops:
                        record["train/mfu"] = tok_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
                    window_tokens, window_start = 0, time.perf_counter()
                if self._crossed(cfg.eval.every_tokens) or last:
                    last_val = self.evaluate()
                    record.update(last_val)
                if record and self.dist.is_main:
                    self.tracker.log({"step": self.step, "tokens_seen": self.tokens_seen, **record})
                if self._crossed(cfg.checkpoint.every_tokens) or last:
                    self.save_checkpoint()
                if self.on_eval is not None and "val/loss" in record:
                    self.on_eval(self.tokens_seen, last_val)
            if not last_val:  # resumed from the final checkpoint: nothing left to train
                last_val = self.evaluate()
            final = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                **last_val,
                "checkpoint": str(list_checkpoints(self.run_dir)[-1]) if self.dist.is_main else "",
                **self.accounting,
                "mlflow_run_id": self.tracker.run_id if self.tracker else None,
            }
            if self.dist.is_main:
                tmp = self.run_dir / "final_metrics.json.tmp"
                tmp.write_text(json.dumps(final, indent=2))
                os.replace(tmp, self.run_dir / "final_metrics.json")
                self.tracker.log_artifact(self.run_dir / "final_metrics.json")
            status = "FINISHED"
            return final
        except EarlyStop:
            status = "KILLED"
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.tracker is not None:
                self.tracker.finish(status)


def train(cfg: Config, method: Method | None = None, progress: bool = True,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    return Trainer(cfg, method, progress, on_eval).train()
