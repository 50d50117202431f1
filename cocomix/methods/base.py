"""The method interface every training method implements, and its registry.

A method builds the model (always `CocomixForCausalLM`, with the method's slot module if it has one)
and computes the loss of one micro-batch. Everything else (data order, token budget, optimizer,
schedule, checkpoints, tracking) is the trainer's and identical across methods, so runs differ only
in the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from cocomix.config import Config, SweepParam
from cocomix.model import CocomixConfig, CocomixForCausalLM, padded_vocab_size

# What a method may need built before it trains (the DAG maps each to the rule that makes it):
#   teacher  the frozen LM (`teacher.path`, or the DAG's teacher run)
#   sae      the TopK SAE on the teacher's residual stream (`sae.path`, or `cocomix train-sae`)
#   labels   the extracted concept-label cache of this run's scoring (`cocomix extract-concepts`)
ARTIFACTS = ("teacher", "sae", "labels")

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method known by its `name` (once)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({REGISTRY[cls.name].__module__}, {cls.__module__})")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Batch:
    """One micro-batch: token blocks plus whatever per-token side data a method needs."""

    input_ids: torch.Tensor  # (B, T)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `to(cuda, non_blocking=True)` overlaps compute."""
        return Batch(self.input_ids.pin_memory(), {k: v.pin_memory() for k, v in self.extras.items()})

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            {k: v.to(device, non_blocking=True) for k, v in self.extras.items()},
        )


class Method:
    """Base class: next-token prediction on the plain backbone. Subclasses override what they change."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = "see the cocomix harness"
    """One sentence for a reader of the model card (`cocomix export`): what the method trains."""
    reads: ClassVar[tuple[str, ...]] = ()
    """Config sections or keys (dotted) this method reads beyond the common ones (data, model, train,
    ...); its runs' fingerprint covers exactly these, so the DAG reruns them only when they change."""
    slot: ClassVar[str | None] = None
    """The model-side module (a name in `cocomix.slots.SLOTS`) this method adds after
    `insert_layer(cfg)` blocks; None: the plain backbone."""

    # ---- what the method declares ----

    def artifacts(self, cfg: Config) -> frozenset[str]:
        """Artifacts (from ARTIFACTS) this run needs before it starts; the DAG builds them."""
        return frozenset()

    def slot_for(self, cfg: Config) -> str | None:
        """The slot module of this run (a method whose model side depends on its config overrides it)."""
        return self.slot

    def insert_layer(self, cfg: Config) -> int:
        """Student blocks before the slot module (CoCoMix's and pause's: `concept.insert_layer`)."""
        return cfg.concept.insert_layer

    def slot_options(self, cfg: Config) -> dict:
        """The slot module's fields (its `Options` in cocomix/slots.py), from this method's config section."""
        return {}

    def tune_space(self, cfg: Config) -> dict[str, SweepParam]:
        """The knobs `cocomix tune` searches for this method (cocomix/tune.py), around the configured values:
        every method's learning rate (x1/4 to x4, log) and warm-up steps (x1/4 to x4, log); subclasses
        add their own. `tune.space.<method>` replaces or adds ranges key by key."""
        t = cfg.train
        lr = float(t.lr)
        warmup = t.warmup_for()
        return {"train.lr": SweepParam("float", lr / 4, lr * 4, log=True),
                "train.warmup_steps": SweepParam("int", max(1, warmup // 4), max(2, 4 * warmup), log=True)}

    # ---- the model ----

    def model_config(self, cfg: Config, vocab_size: int, eos_id: int) -> CocomixConfig:
        """The model's config for the tokenizer's `vocab_size` (or `model.vocab_size`), its embedding and
        LM head padded to a multiple of `model.vocab_multiple` (`real_vocab_size` keeps the real one)."""
        m = cfg.model
        real_vocab = m.vocab_size or vocab_size
        name = self.slot_for(cfg)
        slot = {} if name is None else dict(
            slot=name, insert_layer=self.insert_layer(cfg), slot_options=self.slot_options(cfg))
        return CocomixConfig(
            vocab_size=padded_vocab_size(real_vocab, m.vocab_multiple),
            real_vocab_size=real_vocab,
            n_positions=m.n_positions or cfg.train.block_size,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            dropout=m.dropout,
            init_std=m.init_std,
            layer_norm_eps=m.layer_norm_eps,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            method=self.name,
            **slot,
        )

    def build_model(self, cfg: Config, vocab_size: int, eos_id: int) -> CocomixForCausalLM:
        return CocomixForCausalLM(self.model_config(cfg, vocab_size, eos_id))

    # ---- training hooks ----

    def setup(self, trainer) -> None:
        """Called once after the model is built and moved to its device (load a teacher, a label
        cache, ...). `trainer` exposes cfg, device, model, train_blocks and val_blocks."""

    def extras(self, split: str, block_indices) -> dict[str, torch.Tensor]:
        """Per-block side data for a micro-batch (e.g. cached concept labels), as CPU tensors
        whose first two dimensions are (blocks, block_size). The trainer puts them on `Batch.extras`."""
        return {}

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to minimise, named scalar parts for logging)."""
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        return out.loss, {"ntp_loss": out.loss.detach()}

    def eval_metrics(self, model: torch.nn.Module, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra held-out metrics for one validation batch, each a per-block tensor of shape (B,);
        the trainer averages them over blocks and logs them as `val/<name>`."""
        return {}

    def teacher_flops_per_token(self) -> float:
        """Training FLOPs per token spent outside the student (an online teacher), reported apart."""
        return 0.0

    def one_off_flops(self) -> dict[str, tuple[float | None, str]]:
        """The one-off work this run depends on and shares with the experiment's other runs that read
        it (cocomix/flops.py): {item: (FLOPs or None when not counted, how)}. Called after setup();
        none for a method without a teacher."""
        return {}
