"""Progress output (cocomix/progress.py): a tqdm bar only on a terminal with progress on, else plain,
flushed, one-per-line progress lines, from training, SAE training, concept extraction and prepare-data."""

import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import cocomix.progress as progress_mod
from cocomix.concepts import extract_concepts
from cocomix.config import load_config
from cocomix.data import shards
from cocomix.data.shards import TokenBlocks, load_manifest, prepare_data
from cocomix.methods import get_method
from cocomix.progress import Reporter, duration, si, time_left, use_bar
from cocomix.sae import _fit_sae, init_sae, save_sae
from cocomix.teacher import run_teacher
from conftest import ROOT, cli, tiny_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TIMING = r"elapsed (\S+) left (\S+)"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# ---- the helpers -------------------------------------------------------------------------


def test_duration_strings():
    assert [duration(s) for s in (0, 0.4, 5, 59.6, 62, 3599, 3600, 3725, 86399, 90061)] == [
        "0s", "0s", "5s", "1m00s", "1m02s", "59m59s", "1h00m", "1h02m", "23h59m", "1d01h"]
    assert duration(-3) == "0s"


def test_time_left_is_the_rate_so_far_times_the_work_left():
    assert time_left(elapsed=10.0, done=20, total=100) == pytest.approx(40.0)  # 0.5 s a unit, 80 left
    assert time_left(elapsed=3.0, done=100, total=100) == 0.0
    assert time_left(elapsed=3.0, done=120, total=100) == 0.0  # never negative
    assert time_left(elapsed=3.0, done=0, total=100) is None  # no rate yet


def test_si_suffixes():
    assert [si(x) for x in (0, 12.34, 950, 999.6, 10_234, 123_456, 1_500_000, 2.5e9)] == [
        "0", "12.3", "950", "1k", "10.2k", "123k", "1.5M", "2.5G"]


def test_bar_only_on_a_terminal_with_progress_on(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert use_bar(True) and not use_bar(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    assert not use_bar(True) and not use_bar(False)


def test_reporter_prints_about_every_tenth_with_time_left(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    r = Reporter("work", total=100, unit="item", progress=True)  # stderr is no terminal under pytest
    printed = []
    while r.done < 100:  # 7 items a second
        now[0] += 1.0
        r.update(min(7, 100 - r.done))
        if r.due():
            r.line(f"done {r.done}")
            printed.append(r.done)
    r.close()
    assert printed == [14, 21, 35, 42, 56, 63, 70, 84, 91, 100]  # the first count past each 10, and the end
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "done 14 elapsed 2s left 12s"  # 86 left at 7 a second
    assert out[-1] == "done 100 elapsed 15s left 0s"


def test_reporter_measures_time_left_from_restart_clock_and_never_repeats(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    r = Reporter("train", total=10, unit="step", progress=False, initial=2)  # resumed at step 2
    now[0] = 60.0  # a slow first step (compile): not the rate of the others
    r.update(1)
    r.restart_clock()
    now[0] = 64.0
    r.update(2)  # step 5: 2 steps in 4 s since the first one
    r.line("step 5")
    assert not r.due(final=True)  # nothing new since that line
    assert capsys.readouterr().out == "step 5 elapsed 1m04s left 10s\n"


def test_unknown_total_lines_by_time_and_at_the_end(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    r = Reporter("docs", total=None, unit="doc", progress=False, every_s=30)
    for _ in range(10):
        now[0] += 10
        r.update(5)
        if r.due():
            r.line(f"{r.done} docs")
    assert r.due(final=True)
    r.line(f"{r.done} docs")
    assert capsys.readouterr().out.splitlines() == [
        "15 docs elapsed 30s", "30 docs elapsed 1m00s", "45 docs elapsed 1m30s", "50 docs elapsed 1m40s"]


def test_on_a_terminal_the_bar_draws_and_no_plain_line_is_printed(monkeypatch, capsys):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    r = Reporter("work", total=4, unit="item", progress=True)
    for _ in range(4):
        r.update(1)
        assert not r.due()
        r.line("never printed")
    r.close()
    assert capsys.readouterr().out == ""
    assert "work" in tty.getvalue() and "4/4" in tty.getvalue() and "\r" in tty.getvalue()


# ---- training (the acceptance test: a log file, as the DAG writes it) --------------------


TRAIN_LINE = re.compile(r"^step (\d+)/(\d+) tokens ([\d,]+) loss ([\d.]+) lr (\S+)(?: (\S+) tok/s)? " + TIMING + "$")


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--no-progress"], []], ids=["no-progress", "progress-but-no-tty"])
def test_train_log_file_has_a_progress_line_every_log_step(tmp_path, tiny_data, flag):
    log = tmp_path / "train.log"
    overrides = tiny_overrides(tmp_path, tiny_data, "train.log_every_steps=20", "run_name=p")
    with log.open("wb") as f:  # stdout and stderr to one file, as `> {log} 2>&1`
        proc = subprocess.run(cli("train", "--config", str(ROOT / "config/tiny.yaml"), *flag, *overrides),
                              stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    progress = [TRAIN_LINE.match(line) for line in lines if line.startswith("step ")]
    assert all(progress), [line for line in lines if line.startswith("step ")]
    steps = [int(m[1]) for m in progress]
    assert steps == list(range(20, 161, 20))  # 160 steps of 1024 tokens, a line every 20
    assert {int(m[2]) for m in progress} == {160}
    assert [int(m[3].replace(",", "")) for m in progress] == [s * 1024 for s in steps]
    assert all(m[6] is not None for m in progress)  # tokens/s on every line (the first step is warm-up)
    assert progress[-1][8] == "0s"  # time left at the last step
    # The same loss and lr as the run's record, and in order between its start and done lines.
    run_dir = load_config(ROOT / "config/tiny.yaml", overrides).run_dir
    record = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r}
    for m in progress:
        assert float(m[4]) == pytest.approx(record[int(m[1])]["train/loss"], abs=6e-4)
        assert float(m[5]) == pytest.approx(record[int(m[1])]["train/lr"], rel=1e-2)
    assert "starting from scratch" in lines[0]
    first, last = lines.index(progress[0][0]), lines.index(progress[-1][0])
    assert 0 < first and last < next(i for i, line in enumerate(lines) if line.startswith("done: "))


# ---- SAE training, concept extraction, prepare-data --------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data):
    """A small corpus with the tiny tokenizer, an untrained teacher saved as a checkpoint folder and a
    random SAE on its block 1 (progress needs no trained weights)."""
    root = tmp_path_factory.mktemp("progress")
    teacher_dir = root / "teacher"
    overrides = tiny_overrides(root, root / "data", f"teacher.path={teacher_dir}", "sae.n_latents=128", "sae.k=8",
                               "concept.k=8", "concept.k_attr=4", "data.synthetic.n_tokens=12000",
                               "data.synthetic.seed=7", f"tokenizer.path={tiny_data / 'tokenizer'}",
                               "concept.extract_batch_size=8", "sae.tokens=20480", "sae.batch_tokens=512",
                               "sae.buffer_tokens=4096", "train.log_every_steps=2")
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    prepare_data(cfg, progress=False)
    manifest = load_manifest(cfg.data_dir)
    torch.manual_seed(0)
    teacher = get_method("ntp").build_model(cfg, manifest["vocab_size"], manifest["eos_id"]).eval()
    teacher.save_pretrained(teacher_dir)
    ids = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size).get_batch(range(8))
    _, h = run_teacher(teacher, ids, cfg.sae.layer, stop_at_layer=True)
    save_sae(init_sae(cfg, teacher.config.n_embd, h.reshape(-1, h.size(-1)), seed=3), cfg.experiment_dir / "sae",
             {"layer": cfg.sae.layer})
    return cfg, teacher


class Records:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


SAE_LINE = re.compile(r"^train-sae step (\d+)/(\d+) tokens ([\d,]+) nmse ([\d.]+) auxk ([\d.]+) dead ([\d.]+) "
                      r"(\S+) tok/s " + TIMING + "$")


@pytest.mark.parametrize("progress", [False, True], ids=["no-progress", "progress-but-no-tty"])
def test_sae_training_prints_a_line_about_every_tenth_of_its_steps(small, progress, capsys):
    cfg, teacher = small
    blocks = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size)
    records = Records()
    _fit_sae(cfg, teacher, blocks, records, torch.device("cpu"), progress)
    lines = capsys.readouterr().out.splitlines()
    matches = [SAE_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == list(range(4, 41, 4))  # 40 steps, logged every 2: a line each 10%
    assert {int(m[2]) for m in matches} == {40}
    logged = {r["step"]: r for r in records.records}
    for m in matches:  # what the tracker logged at that step, not another device read
        step = int(m[1])
        assert int(m[3].replace(",", "")) == step * 512
        assert float(m[4]) == pytest.approx(logged[step]["sae/nmse"], abs=6e-5)
        assert float(m[6]) == pytest.approx(logged[step]["sae/dead_fraction"], abs=6e-4)
    assert matches[-1][9] == "0s"


EXTRACT_LINE = re.compile(r"^extract-concepts blocks train ([\d,]+)/([\d,]+) val ([\d,]+)/([\d,]+) " + TIMING + "$")


def test_extraction_prints_blocks_done_per_split_about_every_tenth(small, capsys):
    cfg, _ = small
    n = {s: len(TokenBlocks(cfg.data_dir, s, cfg.train.block_size)) for s in ("train", "val")}
    extract_concepts(cfg, progress=False)
    lines = capsys.readouterr().out.splitlines()
    matches = [EXTRACT_LINE.match(line) for line in lines]
    assert all(matches), lines
    counts = [(int(m[1].replace(",", "")), int(m[3].replace(",", ""))) for m in matches]
    assert {(int(m[2].replace(",", "")), int(m[4].replace(",", ""))) for m in matches} == {(n["train"], n["val"])}
    total, chunks = n["train"] + n["val"], math.ceil(n["train"] / 8) + math.ceil(n["val"] / 8)
    done = [a + b for a, b in counts]
    assert done == sorted(done) and done[-1] == total and counts[-1] == (n["train"], n["val"])
    assert 8 <= len(lines) <= 11 < chunks  # about every 10%, not every chunk of 8 blocks
    assert done[0] >= total // 10
    assert all(t % 8 == 0 or t == n["train"] for t, _ in counts)  # printed at chunk boundaries
    assert matches[-1][6] == "0s"


PREPARE_LINE = re.compile(r"^tokenizing synthetic: ([\d,]+) docs ([\d,]+) tokens (\S+) tok/s elapsed \S+$")


def test_prepare_data_lines_without_carriage_returns(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = load_config(ROOT / "config/tiny.yaml",
                      tiny_overrides(tmp_path, tmp_path / "data", "data.synthetic.n_tokens=12000",
                                     f"tokenizer.path={tiny_data / 'tokenizer'}"))
    monkeypatch.setattr(shards, "_ENCODE_BATCH_DOCS", 8)
    monkeypatch.setattr(shards, "_LINE_EVERY_S", 0.0)  # a line after every batch of 8 documents
    prepare_data(cfg, progress=True)  # stderr is no terminal under pytest: lines, not a bar
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    matches = [PREPARE_LINE.match(line) for line in captured.out.splitlines()]
    assert all(matches), captured.out
    manifest = load_manifest(cfg.data_dir)
    n_docs = sum(s["n_docs"] for s in manifest["splits"].values())
    n_tokens = sum(s["n_tokens"] for s in manifest["splits"].values())
    docs = [int(m[1].replace(",", "")) for m in matches]
    assert docs == list(range(8, n_docs, 8)) + [n_docs]
    assert int(matches[-1][2].replace(",", "")) == n_tokens

    monkeypatch.undo()  # the default: one line per 30 s, and the last
    prepare_data(cfg, progress=False, force=True)
    assert [PREPARE_LINE.match(line)[1] for line in capsys.readouterr().out.splitlines()] == [f"{n_docs:,}"]
