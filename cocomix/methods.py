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
    uses: tuple[str, ...] = ()
    """Config sections (dotted) this method reads beyond the common ones (data, model, train, ...);
    the DAG reruns a method's runs only when these or the common sections change."""

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


def get_method(name: str) -> Method:
    """Methods live in `baselines/` (NTP, KD, pause) and `cocomix/` (CoCoMix)."""
    if name == "ntp":
        from baselines.ntp import NTP

        return NTP()
    if name == "kd":
        from baselines.kd import KD

        return KD()
    if name in ("pause", "kd_pause"):
        from baselines.pause import KDPause, Pause

        return Pause() if name == "pause" else KDPause()
    if name == "cocomix":
        from cocomix.concept_mixing import CoCoMix

        return CoCoMix()
    raise ValueError(f"unknown method {name!r}")
