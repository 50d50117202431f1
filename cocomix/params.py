"""Parameter accounting as the paper does it (spec 1.7), and the NTP width that matches CoCoMix.

*Total* parameters are the unique stored tensors (the tied LM head counts once, embeddings count).
*Active* parameters are those a token uses: everything, except that CoCoMix's compression matrix
W in R^{d x C} contributes only the k columns its TopK concepts select, so CoCoMix adds
(C + k) * d (+ biases) active parameters to the backbone, not 2 * C * d. Baselines are matched by
widening d (spec 2: NTP 624 / 1072 / 2096 against CoCoMix 512 / 1024 / 2048; config/paper.yaml ships
624 / 1080 / 2112, since 1072 and 2096 admit no head width that is a multiple of 8, see `head_counts`).
The padding rows of a padded vocabulary (`model.vocab_multiple`) count in both totals: they are stored,
and the LM-head matmul multiplies through them.

    python -m cocomix.cli params --config config/paper.yaml scale=69M --method cocomix
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cocomix.model import CocomixConfig, CocomixForCausalLM


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int


def count_params(model: CocomixForCausalLM) -> ParamCounts:
    total = model.num_params()
    # CoCoMix's slot gathers only k of the C rows of its (C, d) compression table per token.
    inactive = model.slot.inactive_params() if model.slot is not None else 0
    return ParamCounts(total=total, active=total - inactive)


def count_params_for(config: CocomixConfig) -> ParamCounts:
    """Counts for a config without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return count_params(CocomixForCausalLM(config))


def ntp_params(n_embd: int, n_layer: int, vocab_size: int, n_positions: int) -> int:
    """Closed form of the plain backbone's total (= active) parameters: token and position tables,
    per block 12 d^2 + 13 d (qkv, attention projection, 4d MLP, two LayerNorms, all biases), ln_f.
    vocab_size: the model's rows, padding included (`CocomixConfig.vocab_size`, e.g. 50304 for GPT-2's)."""
    d = n_embd
    return (vocab_size + n_positions) * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def head_counts(n_embd: int, head_dim_multiple: int = 8, min_head_dim: int = 32, max_head_dim: int = 256) -> list[int]:
    """The head counts whose head width n_embd / n_head is a multiple of `head_dim_multiple` within
    [min_head_dim, max_head_dim] (what fused attention kernels run without padding the head: FlashAttention
    and cuDNN take multiples of 8 up to 256; below 32 they pad), fewest heads first. [] if none: e.g.
    1072 = 16 * 67 splits only into heads 8, 16, 536 or 1072 wide, 2096 = 16 * 131 into 8, 16, 1048 or 2096."""
    return [h for h in range(1, n_embd + 1) if n_embd % h == 0 and (n_embd // h) % head_dim_multiple == 0
            and min_head_dim <= n_embd // h <= max_head_dim]


def matching_ntp_width(target_active: int, n_layer: int, vocab_size: int, n_positions: int,
                       multiple_of: int = 16, head_dim_multiple: int | None = None) -> int:
    """The NTP width, a multiple of `multiple_of`, whose parameter count is closest to `target_active`.
    multiple_of=16 reproduces the paper's 624 / 1072 / 2096 (a multiple of 8 would pick 616 at 69M).
    head_dim_multiple: consider only widths with some head count in `head_counts(d, head_dim_multiple)`
    (multiple_of=8, head_dim_multiple=8 picks 1080 and 2112 at 386M and 1.38B).
    vocab_size: the model's rows, padding included (see `ntp_params`)."""
    if target_active <= 0 or multiple_of <= 0:
        raise ValueError("target_active and multiple_of must be positive")

    def error(d: int) -> int:
        return abs(ntp_params(d, n_layer, vocab_size, n_positions) - target_active)

    # params(d) increases with d, so scan multiples up to the first admissible one above the target.
    best, d = None, multiple_of
    while True:
        if head_dim_multiple is None or head_counts(d, head_dim_multiple):
            if best is None or error(d) < error(best):
                best = d
            if ntp_params(d, n_layer, vocab_size, n_positions) > target_active:
                return best
        d += multiple_of
