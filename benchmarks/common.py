"""Helpers shared by the benchmark scripts: device sync and one real training step."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_train_step(method, model, batch, optimizer, autocast, forward=None):
    """The trainer's step for one micro-batch: method loss, backward, clip at 1.0, AdamW.
    `forward` (e.g. a torch.compile'd `model`) runs the loss; `model` owns the parameters."""

    def step():
        with autocast:
            loss, _ = method.loss(forward or model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
