"""Config loading: types, dotted overrides, scales, and one-line errors naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from cocomix.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    # A resolved config round-trips through its dict form unchanged.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_win_over_file():
    cfg = load_config(ROOT / "config/tiny.yaml", ["model.n_embd=64", "train.tokens=1e6", "train.lr=3e-4"])
    assert cfg.model.n_embd == 64 and isinstance(cfg.train.tokens, int) and cfg.train.tokens == 1_000_000
    assert cfg.train.lr == pytest.approx(3e-4)


def test_paper_scales_match_the_spec():
    # spec section 2: NTP widths 624/1072/2096; 40k steps at 0.5M tokens, 20k steps at 1M tokens.
    expected = {"69M": (624, 8, 8, 6e-4, 40_000), "386M": (1072, 24, 16, 3e-4, 40_000), "1.38B": (2096, 24, 16, 2e-4, 20_000)}
    for scale, (d, layers, heads, lr, steps) in expected.items():
        c = load_config(ROOT / "config/paper.yaml", [f"scale={scale}"])
        assert (c.model.n_embd, c.model.n_layer, c.model.n_head) == (d, layers, heads)
        assert c.train.lr == pytest.approx(lr)
        assert c.train.tokens // (c.train.global_batch_size * c.train.block_size) == steps
        assert c.run_dir.name == f"ntp-{scale}-s22"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.n_embed=128"], "model.n_embed"),                 # typo: unknown key
        (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),  # not divisible
        (["model.n_layer=two"], "model.n_layer"),                 # wrong type
        (["train.micro_batch_size=5"], "train.global_batch_size"),
        (["model.dropout=1.5"], "model.dropout"),
        (["data.source=web"], "data.source"),
        (["scale=7B"], "scale"),
        (["model.n_positions=16"], "model.n_positions"),
        (["method=magic"], "method"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "config/tiny.yaml", overrides)
    msg = str(err.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_cli_exits_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_embdd: 12\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cocomix.cli", "train", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["cocomix: error: unknown config key 'model.n_embdd' (expected one of: dropout, init_std, "
                     "layer_norm_eps, n_embd, n_head, n_layer, n_positions, vocab_size)"]
