"""Parameter accounting as the paper does it (spec 1.7), and the NTP width that matches CoCoMix.

*Total* parameters are the unique stored tensors (the tied LM head counts once, embeddings count).
*Active* parameters are those a token uses: everything, except that CoCoMix's compression matrix
W in R^{d x C} contributes only the k columns its TopK concepts select, so CoCoMix adds
(C + k) * d (+ biases) active parameters to the backbone, not 2 * C * d. Baselines are matched by
widening d (spec 2: NTP 624 / 1072 / 2096 against CoCoMix 512 / 1024 / 2048).

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
    per block 12 d^2 + 13 d (qkv, attention projection, 4d MLP, two LayerNorms, all biases), ln_f."""
    d = n_embd
    return (vocab_size + n_positions) * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def matching_ntp_width(target_active: int, n_layer: int, vocab_size: int, n_positions: int,
                       multiple_of: int = 16) -> int:
    """The NTP width, a multiple of `multiple_of`, whose parameter count is closest to `target_active`.
    multiple_of=16 reproduces the paper's 624 / 1072 / 2096 (a multiple of 8 would pick 616 at 69M)."""
    if target_active <= 0 or multiple_of <= 0:
        raise ValueError("target_active and multiple_of must be positive")
    # params(d) increases with d, so scan multiples up to the first one above the target.
    best, d = multiple_of, multiple_of
    while True:
        if abs(ntp_params(d, n_layer, vocab_size, n_positions) - target_active) < \
                abs(ntp_params(best, n_layer, vocab_size, n_positions) - target_active):
            best = d
        if ntp_params(d, n_layer, vocab_size, n_positions) > target_active:
            return best
        d += multiple_of
