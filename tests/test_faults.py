"""Fault injection: SIGKILL at planned points of every stage, then reruns; random bytes written into
every artifact type. Each case must end equal to an uninterrupted run, or in one line naming the file.

Kills use the fault points of `cocomix/faults.py`: a plan (seeded) lists where the next process dies;
the same command is rerun until it succeeds, so each run below is a chain of crashes and recoveries.
Set COCOMIX_FAULT_SEED to try other kill points and byte positions (the default is the one CI runs).
"""

import json
import os
import random
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides
from cocomix import checkpoints
from cocomix.config import _set_dotted, config_from_dict, dump_config, load_config
from cocomix.faults import ENV as FAULTS_ENV
from cocomix.checkpoints import list_checkpoints
from cocomix.files import read_sealed_json

SEED = int(os.environ.get("COCOMIX_FAULT_SEED", "0"))
TIMING = ("tokens_per_s", "mfu")  # the only fields of a record that may differ between runs
KILLS: list[str] = []  # every kill point that fired in this session (printed at the end of each chain)


def _run(argv: list[str], plan_file: Path | None, log: Path, fsize: int | None = None) -> tuple[int, str]:
    """`cocomix <argv>` in a child forked from this process, so it pays no imports (about 10 s of the
    ~12 s a tiny job takes here): a real process that a fault point really SIGKILLs. One thread, as
    the uninterrupted references run; `fsize`: the child's file-size limit in bytes (ulimit -f).
    Returns (exit code, or -signal; its stderr)."""
    import evals.report  # noqa: F401 - imported once here, not in every child
    import evals.run  # noqa: F401
    import cocomix.cli

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
            os.environ.pop(FAULTS_ENV, None)
            if plan_file is not None:
                os.environ[FAULTS_ENV] = str(plan_file)
            torch.set_num_threads(1)
            if fsize is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{log}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
            code = cocomix.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - what a user would see: the test fails on it
            traceback.print_exc()
        finally:
            for f in (sys.stdout, sys.stderr):
                f.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, Path(f"{log}.err").read_text()


def _chain(tmp_path: Path, name: str, argv: list[str], plan: list[tuple[str, int]], check=None) -> list[str]:
    """Run `cocomix <argv>` until it exits 0 under the fault plan. Every death must be the plan's next
    entry firing (a SIGKILL), no process may print a traceback, and the plan must be used up.
    `check()` runs after each kill (what must hold in a crashed state). Returns the sites that fired."""
    plan_file = tmp_path / f"{name}.faults.json"
    plan_file.write_text(json.dumps([{"site": s, "hit": h} for s, h in plan]))
    fired: list[str] = []
    for attempt in range(len(plan) + 1):
        code, err = _run(argv, plan_file, tmp_path / f"{name}.{attempt}")
        assert "Traceback" not in err, err[-3000:]
        left = json.loads(plan_file.read_text())
        if code == -signal.SIGKILL:
            assert len(left) == len(plan) - len(fired) - 1, (name, attempt, left)
            fired.append(f"{plan[len(fired)][0]}#{plan[len(fired)][1]}")
            if check is not None:
                check()
            continue
        assert code == 0, (name, fired, err[-3000:])
        assert left == [], f"{name}: planned kill points never reached: {left}"
        KILLS.extend(f"{name}:{f}" for f in fired)
        print(f"{name}: {len(fired)} kills survived: {fired}")
        return fired
    raise AssertionError(f"{name}: still failing after {len(plan)} kills")


def _ok(argv: list[str], log: Path) -> None:
    code, err = _run(argv, None, log)
    assert code == 0, err[-3000:]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith(TIMING)} for x in lines]


def _no_complete_looking_damage(run_dir: Path) -> None:
    """After a kill: every checkpoint that looks complete is intact; records that exist parse."""
    for ckpt in list_checkpoints(run_dir):
        assert (ckpt / "checkpoint.json").is_file() and checkpoints.damage(ckpt) is None, ckpt
    if (run_dir / "final_metrics.json").exists():
        json.loads((run_dir / "final_metrics.json").read_text())


@pytest.mark.slow
def test_training_eval_and_report_survive_kills_at_every_write_and_end_equal_to_uninterrupted(tmp_path, tiny_data):
    rng = random.Random(SEED)
    tiny = ROOT / "config/tiny.yaml"
    common = ["eval.tasks=[]", "model.dropout=0.1", "train.tokens=40960", "train.log_every_steps=2",
              "eval.every_tokens=10240", "checkpoint.every_tokens=10240"]  # dropout: the RNG state must come back
    ref_args, args = tiny_overrides(tmp_path / "ref", tiny_data, *common), tiny_overrides(tmp_path / "cut", tiny_data, *common)
    ref_dir, run_dir = (load_config(tiny, a).run_dir for a in (ref_args, args))
    _ok(["train", "--config", str(tiny), "--no-progress", *ref_args], tmp_path / "ref")

    # 40 steps, a checkpoint every 10, a metrics line every 2 steps (and a held-out one every 10).
    plan = [("write:config.yaml", 1), ("train.step", rng.randint(2, 9)), ("metrics.line", rng.randint(1, 4)),
            ("checkpoint.model.safetensors", 1), ("checkpoint.trainer_state.pt", 1), ("checkpoint.optimizer.pt", 1),
            ("checkpoint.checkpoint.json", 1), ("checkpoint.renamed", 1),  # step 10 in place, nothing pruned
            ("train.step", rng.randint(1, 9)), ("write:environment.json", 1), ("metrics.line", rng.randint(1, 5)),
            ("checkpoint.renamed", 2),  # steps 20 and 30 from a resume at 10
            ("checkpoint.renamed", 1),  # the final checkpoint, not pruned yet
            ("write:final_metrics.json", 1)]
    _chain(tmp_path, "train", ["train", "--config", str(tiny), "--no-progress", *args], plan,
           check=lambda: _no_complete_looking_damage(run_dir))

    a = load_file(str(list_checkpoints(ref_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact on CPU
    assert _records(run_dir) == _records(ref_dir)  # every line once, none lost, same values
    fa, fb = (json.loads((r / "final_metrics.json").read_text()) for r in (ref_dir, run_dir))
    assert fa["val/loss"] == fb["val/loss"] and fa["step"] == fb["step"] == 40
    assert [c.name for c in list_checkpoints(run_dir)] == [c.name for c in list_checkpoints(ref_dir)]
    assert not list((run_dir / "checkpoints").glob("*.tmp*")) and not list(run_dir.glob("*.tmp*"))  # no litter

    # Evaluation: kills at eval.json writes and at the run's summary; then the same numbers as a
    # fresh evaluation of every checkpoint (--force).
    evaluate = ["eval", str(run_dir), "--no-progress", "eval.tasks=[]", "eval.ppl_max_blocks=32"]
    def intact_records():
        assert all(read_sealed_json(p) is not None for p in run_dir.glob("checkpoints/*/eval.json"))

    _chain(tmp_path, "eval", evaluate, [("write:eval.json", 2), ("write:eval.json", 1), ("write:eval_summary.json", 1)],
           check=intact_records)
    chained = {c.name: read_sealed_json(c / "eval.json")["metrics"] for c in list_checkpoints(run_dir)}
    _ok(evaluate + ["--force"], tmp_path / "eval-ref")
    fresh = {c.name: read_sealed_json(c / "eval.json")["metrics"] for c in list_checkpoints(run_dir)}
    assert chained == fresh and len(fresh) == 4
    assert not list(run_dir.glob("*.tmp*")) and not list(run_dir.glob("checkpoints/*/*.tmp*"))  # no litter

    # The report: kills between its tables and plots; then tables equal to an uninterrupted report.
    experiment = tmp_path / "experiment.yaml"
    dump_config(load_config(tiny, args), experiment)
    report = ["report", "--config", str(experiment)]
    _chain(tmp_path, "report", report, [("write:main.tex", 1), ("write:sample_efficiency.md", 1),
                                        ("write:heldout_loss_base.png", 1)])
    tables = load_config(tiny, args).experiment_dir / "tables"
    chained = {p.name: p.read_bytes() for p in sorted(tables.iterdir())}
    _ok(report, tmp_path / "report-ref")
    assert {p.name: p.read_bytes() for p in sorted(tables.iterdir())} == chained and "main.md" in chained
    assert not list(tables.glob("*.tmp*")) and not list((tables.parent / "plots").glob("*.tmp*"))


@pytest.mark.slow
def test_sae_and_label_extraction_survive_kills_and_end_byte_identical(tmp_path, tiny_data, tiny_teacher):
    rng = random.Random(SEED + 1)
    tiny = ROOT / "config/tiny.yaml"
    extra = [f"teacher.path={tiny_teacher}", "sae.n_latents=256", "sae.k=8", "concept.k=8", "sae.tokens=40960",
             "sae.buffer_tokens=16384", "sae.dead_after_tokens=20000", "concept.extract_batch_size=512"]
    ref, cut = tiny_overrides(tmp_path / "ref", tiny_data, *extra), tiny_overrides(tmp_path / "cut", tiny_data, *extra)
    for command in ("train-sae", "extract-concepts"):
        _ok([command, "--config", str(tiny), "--no-progress", *ref], tmp_path / command)
    ref_cfg, cfg = load_config(tiny, ref), load_config(tiny, cut)

    _chain(tmp_path, "sae", ["train-sae", "--config", str(tiny), "--no-progress", *cut],
           [("sae.step", rng.randint(2, 9)), ("write:sae_config.json", 1), ("write:metrics.json", 1)])
    sae_ref, sae = ref_cfg.experiment_dir / "sae", cfg.experiment_dir / "sae"
    assert (sae / "sae.safetensors").read_bytes() == (sae_ref / "sae.safetensors").read_bytes()
    assert not (sae.parent / "sae.tmp").exists()

    # Labels: ~10 chunks of 512 blocks; kills after a chunk is appended but not recorded, at the
    # progress record, and at the manifest that marks the cache complete.
    _chain(tmp_path, "labels", ["extract-concepts", "--config", str(tiny), "--no-progress", *cut],
           [("labels.chunk", rng.randint(2, 5)), ("write:progress.json", rng.randint(2, 4)),
            ("labels.chunk", rng.randint(1, 3)), ("write:manifest.json", 1)],
           check=lambda: not (Path(cfg.concept_dir) / "manifest.json").exists() or pytest.fail("complete-looking cache"))
    for split in ("train", "val"):
        got = (Path(cfg.concept_dir) / f"{split}.labels.bin").read_bytes()
        assert got == (Path(ref_cfg.concept_dir) / f"{split}.labels.bin").read_bytes(), split
    assert len(KILLS) >= 7


# ---------------------------------------------------------------------------------------------
# Random bytes in every artifact type
# ---------------------------------------------------------------------------------------------


def _damage(path: Path, rng: random.Random, n: int = 16) -> int:
    """Overwrite n bytes at a seeded offset with seeded random bytes (size unchanged); returns the offset."""
    data = bytearray(path.read_bytes())
    at = rng.randrange(0, max(1, len(data) - n))
    data[at : at + n] = bytes(rng.randrange(256) for _ in range(n))
    path.write_bytes(bytes(data))
    return at


def _one_line(excinfo, name: str) -> None:
    """A user error (the CLI prints it as one `cocomix: error:` line) that names the damaged file."""
    from cocomix.cli import USER_ERRORS

    kinds = tuple(getattr(__import__(m, fromlist=[c]), c) for m, c in USER_ERRORS)
    assert isinstance(excinfo.value, kinds), repr(excinfo.value)
    text = str(excinfo.value)
    assert "\n" not in text and name in text, text


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_data):
    """A finished tiny run with two checkpoints and an evaluation of each (eval.json)."""
    from cocomix.trainer import train
    from evals.run import evaluate

    root = tmp_path_factory.mktemp("small")
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(root, tiny_data, "eval.tasks=[]", "train.tokens=8192",
                                                               "checkpoint.every_tokens=4096", "eval.every_tokens=4096"))
    train(cfg, progress=False)
    evaluate(cfg.run_dir, ["eval.tasks=[]", "eval.ppl_max_blocks=8"], progress=False)
    return cfg


def _copy_run(small_run, tmp_path):
    """A copy of the small run under tmp_path (the same config, another results_dir)."""
    from cocomix.config import _set_dotted, config_from_dict

    tree = small_run.to_dict()
    _set_dotted(tree, "results_dir", str(tmp_path))
    cfg = config_from_dict(tree)
    shutil.copytree(small_run.run_dir, cfg.run_dir)
    return cfg


@pytest.mark.slow
def test_random_bytes_in_checkpoints_metrics_and_eval_records_end_in_recovery_or_one_line(tmp_path, small_run,
                                                                                          tiny_data, capsys):
    from cocomix.trainer import Trainer
    from evals.report import load_eval_jsons
    from evals.run import evaluate

    rng = random.Random(SEED + 2)
    cases = 0
    # 1-3. Weights, trainer state or optimizer state of the newest checkpoint: resume falls back to
    # the one before, after moving the damaged one aside.
    for i, name in enumerate(("model.safetensors", "trainer/trainer_state.pt", "trainer/optimizer.pt")):
        cfg = _copy_run(small_run, tmp_path / f"ckpt{i}")
        older, newest = list_checkpoints(cfg.run_dir)
        _damage(newest / name, rng)
        trainer = Trainer(cfg, progress=False)
        assert trainer.resumed_from == older and (newest.parent / f"{newest.name}.damaged").is_dir(), name
        warning = capsys.readouterr().err.strip().splitlines()
        assert len(warning) == 1 and f"is damaged ({name} " in warning[0], warning
        del trainer
        cases += 1
    # 4. Weights of a checkpoint about to be evaluated: one line, nothing evaluated.
    cfg = _copy_run(small_run, tmp_path / "eval-weights")
    ckpt = list_checkpoints(cfg.run_dir)[0]
    (ckpt / "eval.json").unlink()
    _damage(ckpt / "model.safetensors", rng)
    with pytest.raises(Exception) as e:
        evaluate(ckpt, ["eval.tasks=[]", "eval.ppl_max_blocks=8"], config_path=ROOT / "config/tiny.yaml", progress=False)
    _one_line(e, "model.safetensors")
    assert not (ckpt / "eval.json").exists()
    cases += 1
    # 5. eval.json: the report refuses it in one line; `cocomix eval` sees it and evaluates again,
    # to the same numbers.
    cfg = _copy_run(small_run, tmp_path / "eval-json")
    ckpt = list_checkpoints(cfg.run_dir)[-1]
    before = read_sealed_json(ckpt / "eval.json")
    _damage(ckpt / "eval.json", rng)
    with pytest.raises(Exception) as e:
        load_eval_jsons(cfg.run_dir)
    _one_line(e, "eval.json")
    evaluate(cfg.run_dir, ["eval.tasks=[]", "eval.ppl_max_blocks=8"], progress=False)
    assert read_sealed_json(ckpt / "eval.json")["metrics"] == before["metrics"]
    assert "is damaged" in capsys.readouterr().err
    cases += 1
    # 6. metrics.jsonl before the newest checkpoint: resuming would silently lose lines; one line.
    cfg = _copy_run(small_run, tmp_path / "metrics")
    (cfg.run_dir / "final_metrics.json").unlink()
    log = cfg.run_dir / "metrics.jsonl"
    data = bytearray(log.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, a plausible character: only the checkpoint's record can tell
    log.write_bytes(bytes(data))
    with pytest.raises(Exception) as e:
        Trainer(cfg, progress=False).train()
    _one_line(e, "metrics.jsonl")
    cases += 1
    assert cases == 6


@pytest.mark.slow
def test_random_bytes_in_data_labels_and_sae_end_in_one_line(tmp_path, tiny_data, concept_cache):
    from cocomix.concepts import LabelCache
    from cocomix.config import _set_dotted, config_from_dict
    from cocomix.data.shards import load_manifest
    from cocomix.sae import load_sae

    rng = random.Random(SEED + 3)
    root, overrides = concept_cache
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    LabelCache(cfg)  # verified once (the stamp): damage after that must still be seen
    cases = 0
    # 7-8. A shard, the data manifest.
    for i, name in enumerate(("train_000.bin", "manifest.json")):
        data = tmp_path / f"data{i}"
        shutil.copytree(tiny_data, data)
        target = data / name if (data / name).exists() else next(data.glob("train*.bin"))
        _damage(target, rng)
        with pytest.raises(Exception) as e:
            load_manifest(data, verify=True)
        _one_line(e, target.name)
        cases += 1
    # 9-10. A label file (after its verification was stamped), the label cache's manifest.
    for i, name in enumerate(("train.labels.bin", "manifest.json")):
        folder = tmp_path / f"labels{i}"
        shutil.copytree(cfg.concept_dir, folder)
        tree = cfg.to_dict()
        _set_dotted(tree, "concept.cache_dir", str(folder))
        copy = config_from_dict(tree)
        assert Path(copy.concept_dir) == folder
        _damage(folder / name, rng)
        with pytest.raises(Exception) as e:
            LabelCache(copy)
        _one_line(e, name)
        cases += 1
    # 11-12. The SAE's weights, its config.
    for i, name in enumerate(("sae.safetensors", "sae_config.json")):
        folder = tmp_path / f"sae{i}"
        shutil.copytree(cfg.experiment_dir / "sae", folder)
        tree = cfg.to_dict()
        _set_dotted(tree, "sae.path", str(folder))
        _damage(folder / name, rng)
        with pytest.raises(Exception) as e:
            load_sae(config_from_dict(tree))
        _one_line(e, name)
        cases += 1
    assert cases == 6


@pytest.mark.slow
def test_a_checkpoint_edited_after_its_seal_or_of_another_shape_is_one_line(tmp_path, small_run, tiny_data):
    # 13. config.json edited (one layer fewer): evaluation and export would load another model than the
    # one trained; the seal covers every file a loader reads, so both refuse in one line, evaluate nothing.
    from cocomix.export import export
    from cocomix.trainer import Trainer
    from evals.run import evaluate

    cfg = _copy_run(small_run, tmp_path / "config-json")
    ckpt = list_checkpoints(cfg.run_dir)[0]
    (ckpt / "eval.json").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] - 1}))
    for command in (lambda: evaluate(ckpt, ["eval.tasks=[]", "eval.ppl_max_blocks=8"], progress=False),
                    lambda: export(ckpt, tmp_path / "exported")):
        with pytest.raises(Exception) as e:
            command()
        _one_line(e, "config.json")
    assert not (ckpt / "eval.json").exists() and not (tmp_path / "exported").exists()
    # 14. Resuming from a checkpoint of another width: one line naming the first differing tensors.
    tree = cfg.to_dict()
    _set_dotted(tree, "model.n_embd", 32)
    _set_dotted(tree, "run_name", "narrow")
    _set_dotted(tree, "train.resume", str(list_checkpoints(cfg.run_dir)[-1]))
    with pytest.raises(Exception) as e:
        Trainer(config_from_dict(tree), progress=False)
    _one_line(e, "another shape")
    assert re.search(r"tensors differ, first: \S+ \(192,\) vs \(96,\); \S+ \(192, 64\) vs \(96, 32\);", str(e.value))


@pytest.mark.slow
def test_random_bytes_in_the_tokenizer_or_a_json_record_is_one_line_naming_the_file(tmp_path, tiny_data):
    # 15. The data's tokenizer.json (a UnicodeDecodeError traceback before, the file unnamed); 16. the
    # same bytes as text that is not JSON.
    from cocomix.files import read_json
    from cocomix.trainer import Trainer

    rng = random.Random(SEED + 5)
    for i, garbage in enumerate((bytes(rng.randrange(128, 256) for _ in range(512)), b'{"model": {"vocab": [1, 2')):
        data = tmp_path / f"data{i}"
        shutil.copytree(tiny_data, data)
        (data / "tokenizer" / "tokenizer.json").write_bytes(garbage)
        cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / f"r{i}", data, "train.tokens=4096"))
        with pytest.raises(Exception) as e:
            Trainer(cfg, progress=False)
        _one_line(e, "tokenizer.json")
        assert ("not UTF-8 text" if i == 0 else "not valid JSON") in str(e.value)
    with pytest.raises(Exception) as e:
        read_json(data / "tokenizer" / "tokenizer.json")
    assert str(e.value).endswith("not valid JSON (Expecting ',' delimiter at line 1 column 26): damaged, or not the file "
                                 "it should be")


# ---------------------------------------------------------------------------------------------
# The filesystem refuses a write: full, a file-size limit, read-only, no permission
# ---------------------------------------------------------------------------------------------


def _tmpfs(folder: Path, size: str) -> bool:
    """Mount a small tmpfs at `folder` (root only; False where this machine does not allow it)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                                capture_output=True).returncode == 0


def _refused(code: int, err: str, pattern: str) -> None:
    """One line (no traceback), exit 1, matching `pattern`."""
    assert code == 1 and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.strip().splitlines() if x.startswith("cocomix: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-3000:]


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _litter(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def _same_model(run_a: Path, run_b: Path) -> None:
    a = load_file(str(list_checkpoints(run_a)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run_b)[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (json.loads((r / "final_metrics.json").read_text()) for r in (run_a, run_b))
    assert fa["val/loss"] == fb["val/loss"] and fa["step"] == fb["step"] == 40


@pytest.mark.slow
def test_a_full_disk_a_size_limit_or_a_refused_folder_is_one_line_and_the_rerun_ends_equal(tmp_path, tiny_data):
    """17. A checkpoint written past the file-size limit (torch's serializer said only 'unexpected pos');
    18. a disk that fills between checkpoints (tmpfs, as root); 19. a read-only results folder (a
    remounted tmpfs) and one the user may not write (chattr +i as root, else chmod): each one line
    naming the file, the errno in words and what is intact, no temporary file left, and once the cause
    is gone the same command ends equal to an undisturbed run."""
    import subprocess

    tiny = ROOT / "config/tiny.yaml"
    common = ["eval.tasks=[]", "train.tokens=40960", "eval.every_tokens=10240", "checkpoint.every_tokens=10240"]
    train = ["train", "--config", str(tiny), "--no-progress"]
    ref_args = tiny_overrides(tmp_path / "ref", tiny_data, *common)
    _ok(train + ref_args, tmp_path / "ref")
    ref_dir = load_config(tiny, ref_args).run_dir

    # 17. Any user: a limit below the first checkpoint's optimizer state.
    args = tiny_overrides(tmp_path / "fsize", tiny_data, *common)
    run_dir = load_config(tiny, args).run_dir
    optimizer = (list_checkpoints(ref_dir)[-1] / "trainer" / "optimizer.pt").stat().st_size
    code, err = _run(train + args, None, tmp_path / "fsize", fsize=optimizer // 2)
    _refused(code, err, rf"^cocomix: error: cannot write checkpoint {re.escape(str(run_dir))}/checkpoints/step_0000010 "
                        r"\(trainer/optimizer.pt\): file larger than the process's file-size limit allows, ulimit -f "
                        r"\(EFBIG\); no earlier checkpoint exists$")
    assert not _litter(run_dir) and not list_checkpoints(run_dir)
    _ok(train + args, tmp_path / "fsize-rerun")
    _same_model(ref_dir, run_dir)

    # 18. A disk on which the first checkpoint fits and the next does not (one is pruned only after the next).
    disk = tmp_path / "disk"
    ckpt = sum(f.stat().st_size for f in list_checkpoints(ref_dir)[-1].rglob("*") if f.is_file())
    if not _tmpfs(disk, f"{(ckpt * 3 // 2 + (1 << 16)) // 1024}k"):
        pytest.skip("disk-full and read-only cases need root and tmpfs mounts (the size-limit case above ran)")
    try:
        args = tiny_overrides(disk, tiny_data, *common)
        run_dir = load_config(tiny, args).run_dir
        code, err = _run(train + args, None, tmp_path / "full")
        _refused(code, err, rf"cannot write checkpoint {re.escape(str(run_dir))}/checkpoints/step_0000020 \(\S+\): "
                            r"no space left on device \(ENOSPC\); the previous checkpoint step_0000010 "
                            r"is intact \(a resume continues from it once the cause is removed\)$")
        assert not _litter(run_dir) and [c.name for c in list_checkpoints(run_dir)] == ["step_0000010"]
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        _ok(train + args, tmp_path / "full-rerun")
        _same_model(ref_dir, run_dir)

        # 19. Read-only: training again (the run's lock) and evaluating it are one line each.
        evaluate = ["eval", str(run_dir), "--no-progress", "eval.tasks=[]", "eval.ppl_max_blocks=32"]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        _refused(*_run(train + args, None, tmp_path / "ro-train"),
                 rf"cannot write {re.escape(str(run_dir))}/.lock: read-only file system \(EROFS\)")
        _refused(*_run(evaluate, None, tmp_path / "ro-eval"), r"cannot write .*: read-only file system \(EROFS\)")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert not _litter(run_dir)

        # The shards of a corpus larger than the disk's free space: one line, no temporary folder left.
        subprocess.run(["mount", "-o", f"remount,size={du(run_dir.parent.parent.parent) // 1024 + 256}k", str(disk)],
                       check=True)
        data = disk / "data"
        _refused(*_run(["prepare-data", "--config", str(tiny), *tiny_overrides(disk, data)], None, tmp_path / "data"),
                 rf"^cocomix: error: cannot write the shards of {re.escape(str(data))}: no space left on device "
                 r"\(ENOSPC\); the data folder is as it was before$")
        assert not _litter(data) and not (data / ".prepare.tmp").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

    # 19. No permission to write the run folder: its evaluation is one line, then runs once allowed.
    run_dir = load_config(tiny, tiny_overrides(tmp_path / "fsize", tiny_data, *common)).run_dir
    evaluate = ["eval", str(run_dir), "--no-progress", "eval.tasks=[]", "eval.ppl_max_blocks=32"]
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "-R", "+i", str(run_dir)], capture_output=True).returncode == 0
    if not immutable:
        subprocess.run(["chmod", "-R", "a-w", str(run_dir)], check=True)
    try:
        _refused(*_run(evaluate, None, tmp_path / "perm-eval"),
                 rf"cannot write {re.escape(str(run_dir))}/\S+: (operation not permitted \(EPERM\)|permission denied "
                 r"\(EACCES\)); ")
    finally:
        subprocess.run(["chattr", "-R", "-i", str(run_dir)] if immutable else ["chmod", "-R", "u+w", str(run_dir)],
                       check=True)
    assert not _litter(run_dir)
    _ok(evaluate, tmp_path / "perm-eval-rerun")
    assert len(list(run_dir.glob("checkpoints/*/eval.json"))) == len(list_checkpoints(run_dir))
