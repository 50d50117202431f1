"""Training methods on the shared backbone and trainer.

A method builds the model (always `CocomixForCausalLM`, possibly with extra modules switched on by
its config) and computes the loss of one micro-batch. Everything else (data order, token budget,
optimizer, schedule, checkpoints, tracking) is the trainer's and identical across methods, so runs
differ only in the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cocomix.config import Config


@dataclass
class Batch:
    """One micro-batch: token blocks plus whatever per-token side data a method needs."""

    input_ids: torch.Tensor  # (B, T)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            {k: v.to(device, non_blocking=True) for k, v in self.extras.items()},
        )


class Method:
    """Base class: next-token prediction on the plain backbone. Subclasses override hooks."""

    name = "base"

    def model_config(self, cfg: "Config", vocab_size: int, eos_id: int):
        from cocomix.model import CocomixConfig

        m = cfg.model
        return CocomixConfig(
            vocab_size=m.vocab_size or vocab_size,
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
        )

    def build_model(self, cfg: "Config", vocab_size: int, eos_id: int) -> torch.nn.Module:
        from cocomix.model import CocomixForCausalLM

        return CocomixForCausalLM(self.model_config(cfg, vocab_size, eos_id))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to minimise, named scalar parts for logging)."""
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        return out.loss, {"ntp_loss": out.loss.detach()}


def get_method(name: str) -> Method:
    """Methods live in `baselines/` (NTP, KD, pause) and `cocomix/` (CoCoMix)."""
    if name == "ntp":
        from baselines.ntp import NTP

        return NTP()
    raise ValueError(f"unknown method {name!r}")
