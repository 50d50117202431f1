"""Shared fixtures: one tiny synthetic corpus per test session, tiny configs on top of it."""

import os
import re
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GUTENBERG = SHARED / "data" / "corpus" / "gutenberg_top100_authors_subset"

# A model and budget small enough for seconds per run on 2 CPU cores.
TINY = [
    "data.synthetic.n_tokens=400000",
    # The tests' language: 12 topics of nouns, verbs and adjectives, 1-2 per document (the default
    # before 2026-12-04, which the tests' thresholds were set on), whatever config/tiny.yaml says.
    "data.synthetic.n_topics=12",
    "data.synthetic.words_per_topic=40",
    "data.synthetic.parts_of_speech=true",
    "data.synthetic.max_topics_per_doc=2",
    "tokenizer.vocab_size=512",
    "model.n_embd=64",
    "model.n_layer=2",
    "model.n_head=4",
    "train.block_size=64",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.tokens=163840",  # 160 steps of 1024 tokens
    "train.lr=3e-3",
    "train.warmup_steps=10",
    "eval.every_tokens=40960",
    "eval.max_blocks=128",
    "checkpoint.every_tokens=40960",
    "tracking.enabled=false",
    "concept.insert_layer=1",
    "sae.layer=1",
]


def tiny_overrides(results_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return TINY + [f"results_dir={results_dir}", f"data.dir={data_dir}", *extra]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared synthetic corpus (tokenizer + shards + manifest), built once per session."""
    from cocomix.config import load_config
    from cocomix.data.shards import prepare_data

    root = tmp_path_factory.mktemp("tiny")
    data_dir = root / "data"
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(root, data_dir))
    prepare_data(cfg, progress=False)
    return data_dir


def doc_commands(page: str) -> list[str]:
    """Every command line of a page's bash blocks, as a reader would paste it: continuation lines joined,
    comments and blank lines dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r" {2,}", " ", line))
    return out


def cli(*args: str) -> list[str]:
    """The `cocomix` command for subprocesses, independent of PATH."""
    return [sys.executable, "-m", "cocomix.cli", *args]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data) -> Path:
    """A trained 3-layer NTP teacher on the tiny corpus; returns its final checkpoint folder.
    Concept tests read its residual stream after block `sae.layer=1` (the middle block)."""
    from cocomix.config import load_config
    from cocomix.trainer import train

    root = tmp_path_factory.mktemp("teacher")
    cfg = load_config(ROOT / "config/tiny.yaml",
                      tiny_overrides(root, tiny_data, "model.n_layer=3", "train.tokens=327680", "run_name=teacher"))
    return Path(train(cfg, progress=False)["checkpoint"])


@pytest.fixture(scope="session")
def concept_cache(tmp_path_factory, tiny_data, tiny_teacher):
    """SAE on the tiny teacher's middle block, then attribution labels for every train and val block.
    Returns (results root, overrides): CoCoMix runs on these overrides read the cached labels."""
    from cocomix.concepts import extract_concepts
    from cocomix.config import load_config
    from cocomix.sae import train_sae

    root = tmp_path_factory.mktemp("cocomix")
    overrides = tiny_overrides(root, tiny_data, f"teacher.path={tiny_teacher}", "sae.n_latents=256", "sae.k=8",
                               "concept.k=8", "sae.tokens=150000", "sae.dead_after_tokens=100000",
                               "eval.every_tokens=163840", "checkpoint.every_tokens=163840")  # evaluate once, at the end
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    train_sae(cfg, progress=False)
    extract_concepts(cfg, progress=False)
    return root, overrides


# The fast tier (`make test-fast`: pytest -m "not slow") leaves out every test that trains a model
# for more than a few seconds or starts snakemake, a sweep, torchrun or a training subprocess; those
# carry @pytest.mark.slow. A test that uses a fixture which trains is slow through it.
TRAINING_FIXTURES = ("tiny_teacher", "concept_cache")


def _checkout_entries() -> set[str] | None:
    """What `git status` lists in the checkout, ignored files too (folders collapsed); None outside git."""
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching", "--untracked-files=normal"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    skip = ("__pycache__", ".pytest_cache", ".coverage")  # Python's and pytest's own
    return {line[3:] for line in out.stdout.splitlines() if not any(s in line for s in skip)}


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_entries()


def pytest_sessionfinish(session, exitstatus):
    """No test may write into the checkout (an MLflow experiment created without an artifact location
    once left mlruns/ there): the suite fails if `git status` shows anything new after it."""
    before = getattr(session.config, "_checkout_before", None)
    after = _checkout_entries()
    if before is None or after is None or hasattr(session.config, "workerinput"):
        return
    new = sorted(after - before)
    if new:
        print(f"\nFAILED: the tests wrote into the checkout {ROOT}: {new}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.fixturenames for name in TRAINING_FIXTURES):
            item.add_marker(pytest.mark.slow)
