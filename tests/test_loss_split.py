"""The per-token split of the loss gap (evals/loss_split.py) against hand counts: the bigram model
against a Counter, a checkpoint's per-token loss against its own held-out evaluation, the classes as
partitions of the targets and the gap's shares summing to 1."""

import json
from collections import Counter

import numpy as np
import pytest

from cocomix.config import load_config
from cocomix.data.shards import TokenBlocks
from conftest import ROOT, tiny_overrides
from evals.loss_split import SMOOTHING, bigram_nll, gap_rows, per_token_loss, token_set


def test_the_bigram_loss_is_the_smoothed_count_ratio_of_the_training_split(tmp_path, tiny_data):
    train = TokenBlocks(tiny_data, "train", 64)
    pairs, firsts = Counter(), Counter()
    for i in range(len(train)):
        b = train[i].tolist()
        pairs.update(zip(b[:-1], b[1:]))
        firsts.update(b[:-1])
    vocab = int(train.manifest["vocab_size"])
    prev, nxt = np.array([5, 7, 300]), np.array([6, 7, 2])
    got = bigram_nll(train, prev, nxt, vocab)
    want = [-np.log((pairs[(p, n)] + SMOOTHING) / (firsts[p] + SMOOTHING * vocab)) for p, n in zip(prev, nxt)]
    assert got == pytest.approx(want, rel=1e-12)


def test_the_classes_partition_the_targets_and_a_checkpoints_loss_is_its_own_held_out_loss(tmp_path, tiny_data,
                                                                                           tiny_teacher):
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tiny_data))
    tokens = token_set(cfg, max_blocks=128)
    c = tokens.classes
    assert set(c) == {"bigram-easy", "bigram-hard", "topic", "profession", "function"}
    assert ((c["bigram-easy"] ^ c["bigram-hard"])).all()
    assert (c["topic"].astype(int) + c["profession"] + c["function"] == 1).all()
    assert 0.45 < c["bigram-easy"].mean() <= 0.5 and c["topic"].mean() > 0.2 and c["function"].mean() > 0.2
    loss = per_token_loss(tiny_teacher, tokens.blocks)
    assert loss.shape == (128, 63)
    # The teacher was evaluated on the same 128 validation blocks at that checkpoint (eval.max_blocks=128).
    rows = [json.loads(x) for x in (tiny_teacher.parent.parent / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r][-1]
    assert float(loss.mean()) == pytest.approx(val, rel=1e-4)


def test_each_classes_share_of_the_gap_sums_to_one_over_a_partition():
    frac = {"all": 1.0, "easy": 0.25, "hard": 0.75}
    means = {("ntp", "base", 0): {"all": 0.25 * 1.0 + 0.75 * 4.0, "easy": 1.0, "hard": 4.0},
             ("ntp", "base", 1): {"all": 0.25 * 1.2 + 0.75 * 4.4, "easy": 1.2, "hard": 4.4},
             ("cocomix", "base", 0): {"all": 0.25 * 1.1 + 0.75 * 4.2, "easy": 1.1, "hard": 4.2},
             ("cocomix", "base", 1): {"all": 0.25 * 1.2 + 0.75 * 4.8, "easy": 1.2, "hard": 4.8},
             ("cocomix", "base", 2): {"all": 9.0, "easy": 9.0, "hard": 9.0}}  # no NTP seed 2: not paired
    rows = gap_rows(means, frac, ["all", "easy", "hard"])
    by = {r[1]: r for r in rows}
    assert [r[0] for r in rows] == ["cocomix"] * 3 and all(r[-1] == "2" for r in rows)
    assert by["easy"][5].mean == pytest.approx((0.1 + 0.0) / 2) and by["hard"][5].mean == pytest.approx((0.2 + 0.4) / 2)
    assert by["all"][6].mean == pytest.approx(1.0)
    assert by["easy"][6].mean + by["hard"][6].mean == pytest.approx(1.0)
    # easy: mean Δ 0.05 x 0.25 of the targets over the mean total Δ (0.175 + 0.3) / 2
    assert by["easy"][6].mean == pytest.approx(0.05 * 0.25 / 0.2375)
