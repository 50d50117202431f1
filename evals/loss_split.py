"""Where a method's held-out loss gap to NTP lives: the per-token next-token loss of each run's final
checkpoint on the validation blocks (forward passes only), split by what the target token is.

- **bigram-easy / bigram-hard**: the target's loss under a bigram model of the training split (counts
  of (previous token, token), add-0.1 smoothing) below / at or above its median over the validation
  targets. Easy tokens are those the previous token already predicts.
- On the synthetic corpus, by the target word's ground-truth concepts (`cocomix.data.synthetic`):
  **topic** words (slot 0), **profession** words and names (slot 1), **function** words (neither).

For each run paired with the NTP run of its seed and scale: each class's mean loss, the class's
difference to NTP (mean over seeds, paired 95% t-interval) and its **share** of the whole gap, the
class's mean difference times its fraction of the tokens over the mean total difference (shares of
a partition sum to 1).
`cocomix loss-split --config <file>` writes `tables/loss_split.{md,tex,csv}` of the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cocomix.checkpoints import list_checkpoints
from cocomix.config import Config, load_config
from cocomix.data.shards import TokenBlocks
from cocomix.model import CocomixForCausalLM, token_nll
from cocomix.plan import plan_runs

from evals.report.stats import mean_ci95
from evals.report.writers import Cell, Table, write_table

SMOOTHING = 0.1
CLASSES_SYNTHETIC = ("topic", "profession", "function")


def bigram_nll(train: TokenBlocks, targets_prev: np.ndarray, targets: np.ndarray, vocab: int) -> np.ndarray:
    """-log p(token | previous token) of each (prev, target) pair under the training split's bigram
    counts with add-SMOOTHING smoothing. Pairs span every position of every training block."""
    counts = np.zeros(vocab * vocab, dtype=np.int64)
    for start in range(0, len(train), 4096):  # chunks of blocks: bounded memory on a large split
        block = np.stack([train[i] for i in range(start, min(start + 4096, len(train)))]).astype(np.int64)
        counts += np.bincount((block[:, :-1] * vocab + block[:, 1:]).ravel(), minlength=vocab * vocab)
    counts = counts.reshape(vocab, vocab)
    rows = counts.sum(1)
    p = (counts[targets_prev, targets] + SMOOTHING) / (rows[targets_prev] + SMOOTHING * vocab)
    return -np.log(p)


@dataclass
class TokenSet:
    """The validation targets: blocks (n, T) and a boolean mask per class over the (n, T-1) targets."""

    blocks: torch.Tensor
    classes: dict[str, np.ndarray]


def token_set(cfg: Config, max_blocks: int | None = None) -> TokenSet:
    val = TokenBlocks(cfg.data_dir, "val", cfg.train.block_size)
    n = len(val) if max_blocks is None else min(max_blocks, len(val))
    blocks = val.get_batch(range(n))
    ids = blocks.numpy()
    train = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size)
    nll = bigram_nll(train, ids[:, :-1], ids[:, 1:], int(val.manifest["vocab_size"]))
    median = float(np.median(nll))
    classes = {"bigram-easy": nll < median, "bigram-hard": nll >= median}
    if val.has_concepts:
        concepts = val.get_concepts(range(n))[:, 1:]  # the target's concepts
        classes |= {"topic": concepts[..., 0] > 0, "profession": concepts[..., 1] > 0,
                    "function": (concepts == 0).all(-1)}
    return TokenSet(blocks, classes)


@torch.no_grad()
def per_token_loss(checkpoint: Path, blocks: torch.Tensor, batch: int = 64) -> np.ndarray:
    """The checkpoint's next-token loss of every target, (n, T-1), on the CPU in fp32."""
    model = CocomixForCausalLM.from_pretrained(checkpoint).eval()
    out = [token_nll(model(input_ids=blocks[i:i + batch], use_cache=False).logits, blocks[i:i + batch])
           for i in range(0, len(blocks), batch)]
    return torch.cat(out).numpy()


def class_means(loss: np.ndarray, classes: dict[str, np.ndarray]) -> dict[str, float]:
    return {"all": float(loss.mean())} | {name: float(loss[mask].mean()) for name, mask in classes.items()}


def gap_rows(means: dict[tuple[str, str, int], dict[str, float]], frac: dict[str, float],
             order: list[str]) -> list[list]:
    """One row per (run label, class): NTP's and the run's mean loss over the seeds both have, the
    paired difference with its 95% t half-width, and the class's share of the whole gap."""
    rows = []
    for label in dict.fromkeys(k[0] for k in means if k[0] != "ntp"):
        pairs = [(means[k], means[("ntp", k[1], k[2])]) for k in means if k[0] == label and ("ntp", k[1], k[2]) in means]
        if not pairs:
            continue
        for name in order:
            delta, ci = mean_ci95([m[name] - r[name] for m, r in pairs])
            total = mean_ci95([m["all"] - r["all"] for m, r in pairs])[0]
            share = delta * frac[name] / total if total else float("nan")  # a ratio of means: sums to 1
            rows.append([label, name, Cell(100 * frac[name], digits=1),
                         Cell(*mean_ci95([r[name] for _, r in pairs]), digits=3),
                         Cell(*mean_ci95([m[name] for m, _ in pairs]), digits=3),
                         Cell(delta, ci, digits=3, signed=True), Cell(share, digits=2), str(len(pairs))])
    return rows


def loss_split(config_path: str | Path, max_blocks: int | None = None) -> Table:
    """The table: one row per (run label, class) with NTP's and the run's mean loss, their paired
    difference and the class's share of the gap. Runs without a final checkpoint are left out."""
    base = load_config(config_path)
    tokens = token_set(base, max_blocks)
    frac = {name: float(mask.mean()) for name, mask in tokens.classes.items()} | {"all": 1.0}
    means: dict[tuple[str, str, int], dict[str, float]] = {}  # (label, scale, seed) -> class -> mean loss
    for spec in plan_runs(config_path):
        ckpts = list_checkpoints(spec.config(config_path).run_dir)
        if ckpts:
            label = spec.ablation or spec.method
            means[(label, spec.scale or "base", spec.seed)] = class_means(per_token_loss(ckpts[-1], tokens.blocks),
                                                                           tokens.classes)
    rows = gap_rows(means, frac, ["all", *tokens.classes])
    notes = ["Final checkpoints on the validation blocks. loss: mean next-token loss (nats) of the class's targets, "
             "mean over seeds ± 95% t half-width; Δ: the run's minus the same-seed NTP run's, paired; share: "
             "mean Δ × the class's fraction of the tokens / the mean total Δ (the classes of one split sum to 1; "
             "unstable when the total Δ is near 0). bigram-easy: targets whose training-split bigram loss is below its median."]
    return Table(["run", "tokens", "% of targets", "NTP loss", "run loss", "Δ vs NTP", "share of gap", "pairs"], rows,
                 spread={"NTP loss": "ci95", "run loss": "ci95", "Δ vs NTP": "ci95"}, notes_md=notes, md_only=())


def write_loss_split(config_path: str | Path, max_blocks: int | None = None) -> Path:
    cfg = load_config(config_path)
    out = cfg.experiment_dir / "tables"
    write_table(out, "loss_split", loss_split(config_path, max_blocks),
                f"{cfg.experiment}: where the held-out loss gap to NTP lives, by target token")
    return out / "loss_split.md"
