"""The command line on bad input: one line naming the cause, non-zero exit, nothing that looks complete.
Also the real-data path: training on the Gutenberg corpus through the `text` source."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import GUTENBERG, ROOT, tiny_overrides
from cocomix.cli import main
from cocomix.config import config_from_dict, load_config

TINY = str(ROOT / "config/tiny.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _one_line(err):
    lines = [l for l in err if l.startswith("cocomix: error:")]
    assert len(lines) == 1, err
    return lines[0]


TYPO_ERROR = ("cocomix: error: unknown config key 'model.n_embdd' (expected one of: dropout, init_from, init_std, "
              "layer_norm_eps, n_embd, n_head, n_layer, n_positions, vocab_multiple, vocab_size)")


def test_config_typo_fails_before_torch_is_imported():
    # The CLI checks arguments and config first; torch and transformers load only for a valid config.
    code = (
        "import sys\n"
        "from cocomix.cli import main\n"
        "try:\n"
        f"    rc = main(['train', '--config', {TINY!r}, 'model.n_embdd=1'])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines() == [TYPO_ERROR]
    assert proc.stdout.split() == ["2", "False", "False"]


def test_every_user_error_entry_resolves():
    # main() finds the error classes in sys.modules (importing nothing); a moved class must be listed anew.
    import importlib

    from cocomix.cli import USER_ERRORS

    for module, name in USER_ERRORS:
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{module}.{name}"


def test_config_command_prints_the_documented_resolved_config(capsys):
    over = ["model.n_embd=96", "train.tokens=1e6"]
    assert main(["config", "--config", TINY, *over]) == 0
    out = capsys.readouterr().out
    cfg = load_config(TINY, over)
    stripped = "\n".join(line for line in out.splitlines() if not line.lstrip().startswith("#"))
    assert yaml.safe_load(stripped) == cfg.to_dict() and config_from_dict(yaml.safe_load(stripped)) == cfg
    assert "  # Residual-stream width d" in out and "  n_embd: 96" in out


def test_unknown_method_is_named_by_the_method_registry(capsys):
    # config.py accepts any method name; the CLI asks the registry (cocomix.methods) before training.
    code, err = run_cli(capsys, "train", "--config", TINY, "method=magic")
    line = _one_line(err)
    assert code == 2 and "'method'" in line and "magic" in line


@pytest.fixture()
def data_copy(tmp_path, tiny_data):
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def test_missing_corpus_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    data_dir = tmp_path / "data"
    code, err = run_cli(capsys, "prepare-data", "--config", TINY, "data.source=text", f"data.paths=[{missing}]",
                        f"data.dir={data_dir}")
    assert code == 1 and str(missing) in _one_line(err)
    assert not (data_dir / "manifest.json").exists()


def test_empty_corpus_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    data_dir = tmp_path / "data"
    code, err = run_cli(capsys, "prepare-data", "--config", TINY, "data.source=text", f"data.paths=[{empty}]",
                        f"data.dir={data_dir}")
    assert code == 1 and str(empty) in _one_line(err)
    assert not (data_dir / "manifest.json").exists()


def test_train_without_prepared_data(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", TINY, *tiny_overrides(tmp_path, tmp_path / "nodata"))
    line = _one_line(err)
    assert code == 1 and "manifest.json" in line and "prepare-data" in line


@pytest.mark.parametrize("damage, expected", [("flip", "sha256 mismatch"), ("truncate", "size mismatch")])
def test_corrupt_shard_refused(tmp_path, data_copy, capsys, damage, expected):
    shard = data_copy / "train_000.bin"
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[:-2]
    shard.write_bytes(bytes(raw))
    code, err = run_cli(capsys, "train", "--config", TINY, *tiny_overrides(tmp_path, data_copy))
    line = _one_line(err)
    assert code == 1 and expected in line and "train_000.bin" in line
    run_dir = load_config(TINY, tiny_overrides(tmp_path, data_copy)).run_dir
    assert not (run_dir / "final_metrics.json").exists() and not (run_dir / "checkpoints").exists()


def test_model_vocab_too_small_for_shards(tmp_path, tiny_data, capsys):
    code, err = run_cli(capsys, "train", "--config", TINY, *tiny_overrides(tmp_path, tiny_data, "model.vocab_size=100"))
    line = _one_line(err)
    assert code == 1 and "exceeds the model vocab_size 100" in line


def test_tokenizer_that_did_not_make_the_shards(tmp_path, tiny_data, capsys):
    from cocomix.data.tokenizer import train_bpe

    other = tmp_path / "other_tok"
    train_bpe(["completely different text " * 50, "another document"], 300).save_pretrained(other)
    code, err = run_cli(capsys, "train", "--config", TINY, *tiny_overrides(tmp_path, tiny_data, f"tokenizer.path={other}"))
    line = _one_line(err)
    assert code == 1 and "does not match the tokenizer" in line and str(other) in line


@pytest.mark.slow
def test_trains_on_real_gutenberg_text(tmp_path, capsys):
    if not GUTENBERG.is_dir():
        pytest.skip(f"real corpus not found: {GUTENBERG} (shared/data is not committed; see README)")
    over = tiny_overrides(
        tmp_path, tmp_path / "gdata", "data.source=text", f"data.paths=[{GUTENBERG}]", "data.strip_gutenberg=true",
        "data.max_docs=8", "data.val_fraction=0.25", "tokenizer.train_max_chars=3000000", "train.tokens=393216",
    )
    assert main(["prepare-data", "--config", TINY, *over]) == 0
    manifest = json.loads((tmp_path / "gdata" / "manifest.json").read_text())
    assert manifest["source"] == "text" and manifest["splits"]["val"]["n_docs"] >= 1
    assert main(["train", "--config", TINY, "--no-progress", *over]) == 0
    cfg = load_config(TINY, over)
    final = json.loads((cfg.run_dir / "final_metrics.json").read_text())
    from cocomix.data.shards import TokenBlocks

    unigram = TokenBlocks(cfg.data_dir, "val", cfg.train.block_size).unigram_entropy()
    # 384 steps of a 2-layer model on real prose: clearly below the unigram entropy of the val books.
    assert final["val/loss"] < unigram - 0.3, (final["val/loss"], unigram)


def test_dotted_overrides_may_come_after_options(capsys):
    # `cocomix eval RUN --no-progress eval.limit=8` used to fail: "unrecognized arguments".
    from cocomix.cli import parse_args

    args = parse_args(["eval", "RUN", "--no-progress", "eval.tasks=[]", "--limit", "3", "eval.ppl_max_blocks=8"])
    assert (args.path, args.no_progress, args.limit) == ("RUN", True, 3)
    assert args.overrides == ["eval.tasks=[]", "eval.ppl_max_blocks=8"]
    assert parse_args(["train", "a.b=1", "--no-progress", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    with pytest.raises(SystemExit) as e:
        parse_args(["train", "--no-progress", "--bogus", "a.b=1"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("error: unrecognized arguments: --bogus")


def test_version_is_the_installed_packages(capsys):
    import importlib.metadata

    from cocomix.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cocomix {importlib.metadata.version('cocomix')}"
