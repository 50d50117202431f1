"""Held-out perplexity by the paper's protocol (spec section 5, official `test.py`).

The validation shards are cut into consecutive, non-overlapping blocks of `block_size` tokens
(a shard's partial tail is dropped); each block is scored on its own (no context carried over),
its mean next-token NLL is taken, the block means are averaged, and the result is exponentiated:

    ppl = exp( (1/N) * sum_b  mean_{t<T} -log p(x_{b,t+1} | x_{b,<=t}) )

The official code runs batch 1; batching changes nothing because blocks are independent. A padded
vocabulary (`model.vocab_multiple`) changes nothing either: padding ids have -inf logits, probability
exactly 0, so every NLL is the unpadded model's (tested in tests/test_model.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cocomix.data import DataError
from cocomix.data.shards import TokenBlocks
from cocomix.model import token_nll


@torch.no_grad()
def heldout_perplexity(
    model: torch.nn.Module,
    data_dir: str | Path,
    block_size: int,
    batch_size: int = 16,
    max_blocks: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Return {"val_loss", "val_ppl", "val_blocks"} over the first `max_blocks` (default all)
    validation blocks."""
    from tqdm.auto import tqdm

    blocks = TokenBlocks(data_dir, "val", block_size)
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    if n == 0:
        raise DataError(f"{data_dir}: the val split has fewer tokens than one block of {block_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0  # sum over blocks of the per-block mean NLL (float64 on the host)
    bar = tqdm(total=n, desc="held-out perplexity", unit="block", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            ids = blocks.get_batch(range(start, min(start + batch_size, n))).to(device)  # (B, T)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            nll = token_nll(logits, ids)  # (B, T-1): position t predicts token t+1, in >= fp32
            total += nll.mean(dim=1).double().sum().item()
            bar.update(ids.size(0))
    finally:
        bar.close()
        model.train(was_training)
    loss = total / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_blocks": n}
