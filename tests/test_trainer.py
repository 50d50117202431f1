"""The shared trainer: learning, exact resume after SIGKILL, DDP equivalence, NaN guard, tracking."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli, tiny_overrides
from cocomix.config import ConfigError, load_config
from cocomix.data.shards import TokenBlocks
from cocomix.files import sha256_file
from cocomix.trainer import TrainingError, Trainer, list_checkpoints, lr_at, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cfg(tmp_path, data, *extra):
    return load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, data, *extra))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_shape():
    peak, total, warm = 1e-3, 1000, 10
    assert lr_at(0, total, warm, peak, 0.1) == pytest.approx(peak / warm)
    assert lr_at(9, total, warm, peak, 0.1) == pytest.approx(peak)
    assert lr_at(10, total, warm, peak, 0.1) == pytest.approx(peak)
    assert lr_at(505, total, warm, peak, 0.1) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr_at(total, total, warm, peak, 0.1) == pytest.approx(peak * 0.1)


@pytest.mark.slow
def test_ntp_learns_below_unigram_entropy_and_checkpoint_generates(tiny_data, tiny_teacher):
    # The session's teacher is an NTP run of this trainer (TINY, 3 blocks, 327,680 tokens): its own
    # training is the one checked here (a second, identical training cost CI two minutes).
    run_dir = tiny_teacher.parent.parent
    final = json.loads((run_dir / "final_metrics.json").read_text())
    unigram = TokenBlocks(tiny_data, "train", 64).unigram_entropy()  # TINY's train.block_size
    # "Well below": the model must exploit context, not just token frequencies.
    assert final["val/loss"] < 0.8 * unigram, (final["val/loss"], unigram)
    curve = [r["val/loss"] for r in _metrics(run_dir) if "val/loss" in r]
    assert len(curve) == 8 and curve[-1] < curve[0]  # one held-out point every eval.every_tokens=40960
    ckpt = Path(final["checkpoint"])
    assert ckpt == tiny_teacher == list_checkpoints(run_dir)[-1] and ckpt.name == "step_0000320"
    # A fresh process loads the checkpoint through the Auto classes and generates.
    code = (
        "import cocomix, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}); t = AutoTokenizer.from_pretrained({str(ckpt)!r})\n"
        "ids = t('the', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=12, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 12, out.shape\n"
        "print(type(m).__name__, repr(t.decode(out[0])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CocomixForCausalLM")


def _run_cli_train(overrides, env=ENV, **kw):
    return subprocess.Popen(cli("train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *overrides),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# Exact resume after SIGKILL (same weights, val loss and metrics lines as an uninterrupted run, with
# dropout on) is checked through 14 kills at every write of a run in tests/test_faults.py.


def _one_and_two_processes(tmp_path, data, extra, port):
    """The same run on 1 process and under torchrun on 2 gloo processes: the two metrics logs."""
    one = _run_cli_train(tiny_overrides(tmp_path / "one", data, *extra))
    assert one.wait(timeout=600) == 0, one.stderr.read()[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "cocomix.cli", "train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress",
                *tiny_overrides(tmp_path / "two", data, *extra)]
    two = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return [_metrics(load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / n, data, *extra)).run_dir)
            for n in ("one", "two")]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_data):
    extra = ["train.tokens=32768", "train.log_every_steps=1", "train.global_batch_size=16", "train.micro_batch_size=4"]
    m1, m2 = _one_and_two_processes(tmp_path, tiny_data, extra, 29517)
    losses1 = [r["train/loss"] for r in m1 if "train/loss" in r]
    losses2 = [r["train/loss"] for r in m2 if "train/loss" in r]
    assert len(losses1) == len(losses2) == 32
    assert max(abs(x - y) for x, y in zip(losses1, losses2)) < 1e-5
    v1 = [r["val/loss"] for r in m1 if "val/loss" in r]
    v2 = [r["val/loss"] for r in m2 if "val/loss" in r]
    assert max(abs(x - y) for x, y in zip(v1, v2)) < 1e-5


@pytest.mark.slow
def test_ddp_runs_the_prediction_only_ablation_whose_compression_never_reaches_the_loss(tmp_path, tiny_data):
    # concept.mix=none computes the concept but leaves the stream alone, and lam=0 drops the concept
    # loss too: parameters without gradients, which DDP refuses unless told ("Expected to have
    # finished reduction in the prior iteration"). Two gloo processes must train it like one. The
    # global batch equals the micro-batch, so each process runs a smaller pass of its 8 sequences (the
    # old trainer refused: "not divisible by world_size=2 x train.micro_batch_size=16").
    extra = ["method=cocomix", "concept.mix=none", "concept.lam=0", "train.tokens=16384",
             "train.log_every_steps=1", "train.global_batch_size=16", "train.micro_batch_size=16"]
    m1, m2 = _one_and_two_processes(tmp_path, tiny_data, extra, 29519)
    losses = [[r["train/loss"] for r in m if "train/loss" in r] for m in (m1, m2)]
    assert len(losses[0]) == len(losses[1]) == 16
    assert max(abs(x - y) for x, y in zip(*losses)) < 1e-5


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes(tmp_path, tiny_data):
    # The old trainer indexed the checkpoint's RNG list by rank: rank 1 of 2 failed with IndexError.
    common = ["model.dropout=0.1", "train.log_every_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4"]
    one = _run_cli_train(tiny_overrides(tmp_path / "one", tiny_data, *common, "train.tokens=8192"))
    assert one.wait(timeout=600) == 0, one.stderr.read()[-2000:]
    ckpt = list_checkpoints(load_config(ROOT / "config/tiny.yaml",
                                        tiny_overrides(tmp_path / "one", tiny_data, *common)).run_dir)[-1]
    overrides = tiny_overrides(tmp_path / "two", tiny_data, *common, "train.tokens=16384", f"train.resume={ckpt}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
                "-m", "cocomix.cli", "train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *overrides]
    two = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{ckpt}: written by 1 process(es), resumed on 2: continuing, but not bit-exact" in two.stdout
    steps = [r["step"] for r in _metrics(load_config(ROOT / "config/tiny.yaml", overrides).run_dir) if "train/loss" in r]
    assert steps == list(range(17, 33))  # continues after the checkpoint's 16 steps (512 tokens each)


def test_cuda_rng_state_is_this_devices_even_from_a_checkpoint_of_eight_visible_gpus():
    from cocomix.checkpoints import cuda_rng_for_this_device

    # Old checkpoints stored every visible device's state (torch.cuda.get_rng_state_all); restoring
    # all eight where one is visible failed. Now: this device's entry, or none.
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(cuda_rng_for_this_device(states, 0), states[0])
    assert cuda_rng_for_this_device(states[:1], 3) is None
    assert cuda_rng_for_this_device(states[5], 0) is states[5]  # new checkpoints: one tensor, this device's


def test_no_step_reads_a_value_back_from_the_device_except_at_log_steps(tmp_path, tiny_data, monkeypatch):
    # The old step called .item() on the loss every step (a GPU host sync before the next step could
    # be queued). Count Tensor.item calls per step of a run that logs and evaluates only at its end.
    from cocomix.callbacks import Callback

    calls = [0]
    item = torch.Tensor.item

    def counting_item(self):  # calls from this project's code (CPU AdamW's own .item() is not a GPU path)
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith((str(ROOT / "cocomix"), str(ROOT / "baselines"))):
            calls[0] += 1
        return item(self)

    class Record(Callback):
        def __init__(self):
            self.per_step = []

        def on_step(self, trainer, step, record):
            self.per_step.append(calls[0])

    cfg = _cfg(tmp_path, tiny_data, "train.tokens=12288", "train.log_every_steps=100", "eval.every_tokens=12288",
               "checkpoint.every_tokens=12288")
    record = Record()
    trainer = Trainer(cfg, progress=False, callbacks=[record])
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    trainer.train()
    assert len(record.per_step) == 12
    assert record.per_step[:11] == [0] * 11  # steps 1-11: nothing read back
    assert record.per_step[11] > 0  # the last step logs, checks the NaN flag and evaluates


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, tiny_data):
    from baselines.ntp import NTP

    class PoisonAtStep5(NTP):
        """NTP whose 6th optimizer step sees a NaN loss (a stand-in for a diverging run)."""

        def __init__(self):
            self.calls = 0

        def loss(self, model, batch):
            self.calls += 1
            loss, parts = super().loss(model, batch)
            if self.calls > 5 * 2:  # 2 micro-batches per step
                loss = loss * float("nan")
            return loss, parts

    # The guard reads the device-side flag at log steps (every 4) and before each checkpoint (every
    # 5 steps), never every step: the NaN of step 6 is caught at step 8, naming step 5's checkpoint.
    cfg = _cfg(tmp_path, tiny_data, "train.log_every_steps=4", "checkpoint.every_tokens=5120")
    trainer = Trainer(cfg, PoisonAtStep5(), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient norm between step 6 and step 8 "
                                            r"\(tokens 8192\); last good checkpoint: .*step_0000005$"):
        trainer.train()
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_0000005"]  # nothing saved after the NaN
    saved = load_file(str(list_checkpoints(cfg.run_dir)[-1] / "model.safetensors"))
    # The checkpoint holds the weights after 5 good steps: they moved, and are finite.
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any((saved[k] - before[k]).abs().max() > 0 for k in saved)


def test_throughput_leaves_out_evaluation_checkpoints_and_the_first_step(tmp_path, tiny_data, monkeypatch):
    import cocomix.callbacks
    import cocomix.trainer
    from baselines.ntp import NTP

    class Clock:
        """The real clock, plus 100 s each time the evaluation runs (so CPU load cannot blur it)."""

        offset = 0.0

        def perf_counter(self):
            return time.perf_counter() + self.offset

    clock = Clock()
    monkeypatch.setattr(cocomix.callbacks, "time", clock)
    monkeypatch.setattr(cocomix.trainer, "time", clock)

    class SlowEval(NTP):
        """NTP whose held-out evaluation takes 100 s more."""

        def eval_metrics(self, model, batch, logits):
            clock.offset += 100.0
            return {}

    # 32 steps of 1024 tokens, a line every 4 steps, an evaluation and a checkpoint at step 16 (inside
    # the window of steps 17-20) and at the end.
    cfg = _cfg(tmp_path, tiny_data, "train.tokens=32768", "train.log_every_steps=4", "eval.every_tokens=16384",
               "eval.max_blocks=16", "eval.batch_size=16", "checkpoint.every_tokens=16384")
    final = Trainer(cfg, SlowEval(), progress=False).train()
    rates = [r["train/tokens_per_s"] for r in _metrics(cfg.run_dir) if "train/tokens_per_s" in r]
    assert len(rates) == 8
    window_s = [3072 / rates[0]] + [4096 / r for r in rates[1:]]  # step 1 (warm-up) is in no window
    # The old window of steps 17-20 counted the evaluation's 100 s.
    assert max(window_s) < 50, window_s
    assert final["tokens_per_s"] == pytest.approx(31 * 1024 / sum(window_s), rel=1e-6)  # the run's average
    assert final["mfu"] is None  # no MFU on CPU
    assert 0.1 < final["peak_memory_gib"] < 24  # the peak resident set on a CPU (the CUDA peak on a GPU)
    assert final["gpu_util"] is None  # NVML utilisation: GPUs only (nvidia-ml-py is installed here)
    assert not any("train/gpu_util" in r for r in _metrics(cfg.run_dir))


def test_seeds_vary_the_data_order_every_method_of_a_seed_shares_it_and_data_seed_fixes_it(tmp_path, tiny_data):
    # Seeds used to vary only the initial weights: every seed read the same blocks in the same order,
    # so the spread over seeds left out the data order's share of the noise.
    from cocomix.data.shards import BlockOrder

    def order(name, *extra):
        trainer = Trainer(_cfg(tmp_path / name, tiny_data, "train.tokens=4096", *extra), progress=False)
        return trainer.order.take(0, 64).tolist(), len(trainer.train_blocks)

    (ntp0, n_blocks), (ntp1, _) = order("a", "seed=0"), order("b", "seed=1")
    assert ntp0 == BlockOrder(n_blocks, 0).take(0, 64).tolist() and ntp1 == BlockOrder(n_blocks, 1).take(0, 64).tolist()
    assert ntp0 != ntp1
    assert order("c", "seed=1", "method=pause")[0] == ntp1  # methods of one seed pair: the same blocks
    fixed = BlockOrder(n_blocks, 5).take(0, 64).tolist()
    assert order("d", "seed=0", "train.data_seed=5")[0] == order("e", "seed=1", "train.data_seed=5")[0] == fixed


def test_interleaving_runs_log_their_readout_diagnostics_at_every_evaluation(tmp_path, tiny_data):
    # mix_only (concept.lam=0) needs no labels: a CoCoMix model trained through the LM loss alone.
    T = 64  # train.block_size of the tiny configs
    uniform = {"concept": sum(1 / (2 * t + 2) for t in range(T)) / T, "token": sum(1 / (2 * t + 1) for t in range(T)) / T}
    common = ["train.tokens=8192", "eval.every_tokens=4096", "eval.max_blocks=8"]
    for name, extra, readout in (("mix", ["method=cocomix", "concept.lam=0"], "concept"),
                                 ("tok", ["method=cocomix", "concept.lam=0", "concept.readout=token"], "token"),
                                 ("pause", ["method=pause", "pause.readout=token"], "token")):
        final = train(_cfg(tmp_path / name, tiny_data, *common, *extra), progress=False)
        evals = [r for r in _metrics(tmp_path / name / "tiny" / "runs" / f"{extra[0][7:]}-base-s0") if "val/loss" in r]
        assert len(evals) == 2, name
        for rec in evals + [final]:
            assert 0.0 < rec["val/readout_self_attn"] < 1.0, name
            assert rec["val/readout_self_attn_uniform"] == pytest.approx(uniform[readout], rel=1e-6), name
            if name == "pause":
                assert "val/loss_no_concept" not in rec
            else:  # removing the concept code changes the loss
                assert abs(rec["val/loss_no_concept"] - rec["val/loss"]) > 1e-4, name
    final = train(_cfg(tmp_path / "off", tiny_data, *common, "method=pause", "eval.diagnostics=false"), progress=False)
    assert not any(k.startswith("val/readout") for k in final)


def test_only_the_newest_checkpoints_keep_the_optimizer_state(tmp_path, tiny_data):
    # Every checkpoint used to carry the optimizer (about 2.3 TB over the paper's DAG by estimate);
    # only resuming reads it: from the newest checkpoint, or the one before if the newest is damaged.
    cfg = _cfg(tmp_path, tiny_data, "train.tokens=12288", "checkpoint.every_tokens=4096", "checkpoint.keep_last=0")
    train(cfg, progress=False)
    ckpts = list_checkpoints(cfg.run_dir)
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000008", "step_0000012"]
    assert [(p / "trainer" / "optimizer.pt").exists() for p in ckpts] == [False, True, True]  # keep_optimizer: 2
    assert all((p / "model.safetensors").exists() and (p / "trainer" / "trainer_state.pt").exists() for p in ckpts)
    assert not any((p / name).exists() for p in ckpts for name in ("optimizer.pt", "trainer_state.pt"))  # apart
    more = _cfg(tmp_path, tiny_data, "train.tokens=16384", "checkpoint.every_tokens=4096", "checkpoint.keep_last=0",
                f"train.resume={ckpts[0]}")
    with pytest.raises(TrainingError, match=r"step_0000004: has no trainer/optimizer.pt \(only the newest "
                                            r"checkpoint.keep_optimizer"):
        Trainer(more, progress=False)
    resumed = Trainer(_cfg(tmp_path, tiny_data, "train.tokens=16384", "checkpoint.every_tokens=4096",
                           "checkpoint.keep_last=0", f"train.resume={ckpts[-1]}"), progress=False)
    assert resumed.step == 12 and resumed.optimizer.state_dict()["state"]


@pytest.mark.slow
def test_mlflow_run_has_params_tags_and_metric_history(tmp_path, tiny_data):
    import mlflow

    cfg = _cfg(tmp_path, tiny_data, "tracking.enabled=true", "train.tokens=40960", "train.log_every_steps=5")
    final = train(cfg, progress=False)
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["run_id"] == final["mlflow_run_id"] and row["status"] == "FINISHED"
    assert row["params.model.n_embd"] == "64" and row["params.train.block_size"] == "64"
    assert row["tags.method"] == "ntp" and row["tags.seed"] == "0" and row["tags.git_commit"]
    # MLflow's standard tags (its UI's User and Source columns), which runs used to lack.
    import getpass

    assert row["tags.mlflow.user"] == getpass.getuser()
    assert row["tags.mlflow.source.git.commit"] == row["tags.git_commit"].removesuffix("-dirty")
    history = mlflow.MlflowClient(uri).get_metric_history(final["mlflow_run_id"], "train/loss")
    # step = tokens seen: logged every 5 optimizer steps of 1024 tokens.
    assert [m.step for m in history] == [5120 * i for i in range(1, 9)]
    jsonl = [r for r in _metrics(cfg.run_dir) if "train/loss" in r]
    assert [m.value for m in history] == pytest.approx([r["train/loss"] for r in jsonl])


def test_run_killed_while_its_mlflow_run_was_created_is_continued_not_duplicated(tmp_path, tiny_data):
    """The run id is recorded in the run folder right after the MLflow run is created; a run killed
    before its params were logged is continued on resume, with its params completed."""
    import mlflow

    from cocomix.tracking import RunTracker, init_store

    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    cfg = _cfg(tmp_path, tiny_data, "tracking.enabled=true", f"tracking.uri={uri}", "train.tokens=10240")
    init_store(uri)
    client = mlflow.MlflowClient(uri)
    # What a kill between create_run and logging the params leaves behind: a bare run and its id.
    exp_id = client.create_experiment("tiny", artifact_location=(tmp_path / "mlartifacts").as_uri())
    bare = client.create_run(exp_id, run_name="ntp-base-s0").info.run_id
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "mlflow_run_id").write_text(bare)
    final = train(cfg, progress=False)
    assert final["mlflow_run_id"] == bare
    (run,) = client.search_runs([exp_id])
    assert run.info.run_id == bare and run.info.status == "FINISHED"
    assert run.data.params["model.n_embd"] == "64" and run.data.tags["method"] == "ntp"
    # A second tracker on the finished folder continues the same run instead of creating another.
    assert RunTracker(cfg, cfg.run_dir, {"method": "ntp"}).run_id == bare
    assert len(client.search_runs([exp_id])) == 1


def test_changed_config_starts_over_instead_of_resuming(tmp_path, tiny_data):
    """Auto-resume continues only a run made with the same config; a stale one is moved aside."""
    first = train(_cfg(tmp_path, tiny_data, "train.tokens=20480"), progress=False)
    cfg = _cfg(tmp_path, tiny_data, "train.tokens=20480", "train.lr=1e-3")
    (cfg.run_dir / "eval_summary.json").write_text("{}")  # what `cocomix eval` wrote for the old run
    (cfg.run_dir / "eval").mkdir()
    second = train(cfg, progress=False)
    stale = cfg.run_dir / "superseded-1"
    assert (stale / "checkpoints").is_dir() and (stale / "final_metrics.json").exists()
    # Every file of the old run moved (the old code left eval_summary.json beside the new run's files).
    assert (stale / "eval_summary.json").exists() and (stale / "eval").is_dir() and (stale / "environment.json").exists()
    assert not (cfg.run_dir / "eval_summary.json").exists() and not (cfg.run_dir / "eval").exists()
    assert second["val/loss"] != first["val/loss"]
    # The new run trained all 20 steps itself: its log starts again from the first steps.
    assert _metrics(cfg.run_dir)[0]["step"] == 10
    # Only execution settings changed: the run is resumed, not superseded.
    again = train(_cfg(tmp_path, tiny_data, "train.tokens=20480", "train.lr=1e-3", "train.log_every_steps=5"),
                  progress=False)
    assert again["val/loss"] == second["val/loss"] and not (cfg.run_dir / "superseded-2").exists()


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(tmp_path, tiny_data, capfd):
    # The old resume read the truncated model.safetensors and stopped with a safetensors traceback.
    cfg = _cfg(tmp_path, tiny_data, "train.tokens=12288", "checkpoint.every_tokens=4096", "model.dropout=0.1")
    first = train(cfg, progress=False)
    ckpts = list_checkpoints(cfg.run_dir)
    reference = {k: v.clone() for k, v in load_file(str(ckpts[-1] / "model.safetensors")).items()}  # not the mmap
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    again = train(cfg, progress=False)
    err = capfd.readouterr().err
    size = Path(f"{ckpts[-1]}.damaged/model.safetensors").stat().st_size
    assert (f"warning: checkpoint {ckpts[-1]} is damaged (model.safetensors has {size} bytes, checkpoint.json "
            f"records {2 * size}"in err or f"records {2 * size + 1}" in err)
    assert f"moved to {ckpts[-1]}.damaged, resuming from the one before it" in err
    # Resumed at step 8 and retrained 9-12: the weights of the first time (exact resume: 1e-6 on CPU).
    redone = load_file(str(list_checkpoints(cfg.run_dir)[-1] / "model.safetensors"))
    assert max((reference[k] - redone[k]).abs().max().item() for k in reference) <= 1e-6
    assert again["val/loss"] == pytest.approx(first["val/loss"], abs=1e-6)
    # A damaged record is refused when named explicitly.
    (ckpts[0] / "checkpoint.json").write_text("{not json")
    with pytest.raises(TrainingError, match=r"step_0000004 is damaged: checkpoint.json unreadable"):
        Trainer(_cfg(tmp_path, tiny_data, "train.tokens=12288", "checkpoint.every_tokens=4096", "model.dropout=0.1",
                     f"train.resume={ckpts[0]}"), progress=False)


def _to_old_layout(ckpt: Path) -> None:
    """What checkpoints looked like before trainer/: trainer_state.pt and optimizer.pt beside the
    weights, checkpoint.json recording them under those names."""
    for name in ("trainer_state.pt", "optimizer.pt"):
        os.replace(ckpt / "trainer" / name, ckpt / name)
    (ckpt / "trainer").rmdir()
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["files"] = {name.removeprefix("trainer/"): record for name, record in meta["files"].items()}
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def test_checkpoints_resume_exactly_from_the_trainer_folder_and_from_the_old_layout(tmp_path, tiny_data):
    """A checkpoint keeps its trainer state in step_<N>/trainer/ (the step folder itself is a plain HF
    model folder); one resumed from it, or from a checkpoint of the old layout (trainer_state.pt and
    optimizer.pt beside the weights), ends with the uninterrupted run's weights (dropout on)."""
    from cocomix import checkpoints

    extra = ("train.tokens=12288", "checkpoint.every_tokens=4096", "checkpoint.keep_last=0", "model.dropout=0.1")
    reference = _cfg(tmp_path / "ref", tiny_data, *extra, "checkpoint.keep_optimizer=0")  # every one resumable
    first = train(reference, progress=False)
    ckpts = list_checkpoints(reference.run_dir)
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000008", "step_0000012"]
    for ckpt in ckpts:
        assert {p.name for p in (ckpt / "trainer").iterdir()} <= {"trainer_state.pt", "optimizer.pt"}
        sealed = set(json.loads((ckpt / "checkpoint.json").read_text())["files"])  # every file written with it
        assert sealed == set(checkpoints.sealed_files(ckpt)) >= set(checkpoints.VERIFIED) | {"config.json", "model.py"}
    want = load_file(str(ckpts[-1] / "model.safetensors"))

    def rerun(name, prepare, *more):
        cfg = _cfg(tmp_path / name, tiny_data, *extra, *more)
        shutil.copytree(reference.run_dir, cfg.run_dir)
        done = list_checkpoints(cfg.run_dir)
        prepare(done)
        trainer = Trainer(cfg, progress=False)
        resumed = trainer.resumed_from
        final = trainer.train()
        got = load_file(str(list_checkpoints(cfg.run_dir)[-1] / "model.safetensors"))
        assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6, name
        assert final["val/loss"] == pytest.approx(first["val/loss"], abs=1e-6)
        return cfg, resumed

    # New layout: resume at step 8 (the newest left), retrain 9-12.
    cfg, resumed = rerun("new", lambda done: shutil.rmtree(done[-1]), "checkpoint.keep_optimizer=0")
    assert resumed.name == "step_0000008"
    # Old layout: resume at step 4 from a checkpoint written before trainer/; it verifies, resumes and is
    # pruned like the new ones (keep_optimizer=2: its optimizer.pt goes once two newer ones exist).
    def old(done):
        shutil.rmtree(done[1]), shutil.rmtree(done[2])
        _to_old_layout(done[0])
        assert checkpoints.damage(done[0]) is None and checkpoints.trainer_folder(done[0]) == done[0]

    cfg, resumed = rerun("old", old, "checkpoint.keep_optimizer=2")
    assert resumed.name == "step_0000004"
    ckpts = list_checkpoints(cfg.run_dir)
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000008", "step_0000012"]
    assert (ckpts[0] / "trainer_state.pt").is_file() and not (ckpts[0] / "optimizer.pt").exists()
    assert all((p / "trainer" / "trainer_state.pt").is_file() for p in ckpts[1:])  # written after resuming: new
    # An old-layout checkpoint named explicitly resumes too.
    _to_old_layout(ckpts[-1])
    again = Trainer(_cfg(tmp_path / "old", tiny_data, *extra, f"train.resume={ckpts[-1]}"), progress=False)
    assert again.step == 12 and again.optimizer.state_dict()["state"]


def test_weights_and_records_follow_the_umask(tmp_path, tiny_data):
    # safetensors writes 0600 whatever the umask: colleagues on a shared filesystem could not load the
    # weights. Everything a checkpoint holds now gets the modes a plain open() would.
    old = os.umask(0o022)
    try:
        cfg = _cfg(tmp_path, tiny_data, "train.tokens=4096")
        train(cfg, progress=False)
    finally:
        os.umask(old)
    ckpt = list_checkpoints(cfg.run_dir)[-1]
    modes = {p.relative_to(ckpt).as_posix(): p.stat().st_mode & 0o777 for p in ckpt.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert "trainer/optimizer.pt" in modes
    assert ckpt.stat().st_mode & 0o777 == 0o755 and (ckpt / "trainer").stat().st_mode & 0o777 == 0o755
    assert (cfg.run_dir / "final_metrics.json").stat().st_mode & 0o777 == 0o644


HOLD_RUN = """
import sys, time
from cocomix.files import lock_run
fh = lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_one_writer_per_run_folder_and_a_killed_holder_frees_it(tmp_path, tiny_data):
    # Two `cocomix train` on one run folder both used to finish, writing every metrics line twice.
    overrides = tiny_overrides(tmp_path, tiny_data, "train.tokens=4096")
    run_dir = load_config(ROOT / "config/tiny.yaml", overrides).run_dir
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _run_cli_train(overrides)
        assert second.wait(timeout=300) == 1
        lines = second.stderr.read().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cocomix: error: run folder {run_dir} is in use by pid "
                                                       f"{holder.pid} on "), lines
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock: nothing to clean up
        holder.wait()
    third = _run_cli_train(overrides)
    assert third.wait(timeout=300) == 0, third.stderr.read()[-2000:]


class _RunsCode:
    """A pickle that runs code when unpickled (what a crafted trainer_state.pt could carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_trainer_state_that_would_run_code(tmp_path, tiny_data):
    cfg = _cfg(tmp_path, tiny_data, "train.tokens=20480")
    ckpt = Trainer(cfg, progress=False).save_checkpoint()
    state_file = ckpt / "trainer" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)  # what we write is tensors and plain data
    assert isinstance(state["rng"][0]["numpy"][1], torch.Tensor)
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": _RunsCode(marker)}, state_file)
    # A crafted folder whose checkpoint.json vouches for the crafted file (else it is merely damaged).
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["files"]["trainer/trainer_state.pt"] = {"bytes": state_file.stat().st_size, "sha256": sha256_file(state_file)}
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"trainer/trainer_state.pt holds objects other than tensors and plain data"):
        Trainer(cfg, progress=False)
    assert not marker.exists()  # refused before anything was unpickled


DDP_EVERY_METHOD = """
import json, sys
from cocomix.config import ConfigError, load_config
from cocomix.trainer import Trainer
config, common, variants = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
losses = {}
for name, extra in variants.items():
    trainer = Trainer(load_config(config, common + [f"run_name={name}"] + extra), progress=False)
    losses[name] = trainer.train()["val/loss"]
    assert trainer.dist.world_size == 2
if trainer.dist.is_main:
    print("LOSSES " + json.dumps(losses))
"""


@pytest.mark.slow
def test_ddp_trains_every_method_and_every_ablation_of_the_paper_dag(tmp_path, tiny_data, tiny_teacher):
    # DDP refuses a step where a parameter got no gradient unless told; each method and each of the
    # paper's ablations runs 2 steps on 2 gloo processes (one torchrun, one process group).
    from test_baselines import _random_sae

    sae = _random_sae(tmp_path / "sae", 64, 64, 8, layer=1)
    common = tiny_overrides(tmp_path, tiny_data, "train.tokens=2048", "eval.max_blocks=16", f"teacher.path={tiny_teacher}",
                            f"sae.path={sae}", "sae.n_latents=64", "sae.k=8", "concept.k=8", "concept.labels=online")
    ablations = load_config(ROOT / "config/paper.yaml").dag.ablations
    variants = {m: [f"method={m}"] for m in ("ntp", "kd", "pause", "kd_pause", "cocomix")}
    variants |= {name: ["method=cocomix", *(f"{k}={v}" for k, v in changes.items())] for name, changes in ablations.items()}
    script = tmp_path / "ddp_every_method.py"
    script.write_text(DDP_EVERY_METHOD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29527", str(script),
           str(ROOT / "config/tiny.yaml"), json.dumps(common), json.dumps(variants)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.split("LOSSES ", 1)[1].splitlines()[0])
    assert set(losses) == set(variants) == {"ntp", "kd", "pause", "kd_pause", "cocomix", "act_labels", "pred_only",
                                            "mix_only", "add"}
    assert all(math.isfinite(v) for v in losses.values()), losses


def test_a_budget_of_more_than_16_passes_over_the_data_needs_allow_repeat(tmp_path, tiny_data):
    # Refused before any model is built; one line naming the key, the passes and the consent key.
    block = _cfg(tmp_path, tiny_data).train.block_size
    split = json.loads((tiny_data / "manifest.json").read_text())["splits"]["train"]["n_tokens"] // block * block
    tokens = 17 * split
    with pytest.raises(ConfigError, match=r"^config key 'train.tokens': [\d,]+ tokens are 17 passes over the "
                                          r"training split \([\d,]+ tokens in .*\); more than 16 needs "
                                          r"train.allow_repeat=true$"):
        Trainer(_cfg(tmp_path / "a", tiny_data, f"train.tokens={tokens}"), progress=False)
    assert not (tmp_path / "a").exists()  # nothing written
    trainer = Trainer(_cfg(tmp_path / "b", tiny_data, f"train.tokens={tokens}", "train.allow_repeat=true"),
                      progress=False)
    assert trainer.total_steps * trainer.tokens_per_step > 16 * split


def test_a_model_too_large_for_this_machine_is_refused_before_anything_is_allocated(tmp_path, tiny_data):
    # model.n_embd=65536 ended in the allocator's 51 GB RuntimeError after start-up. Now one line with
    # the estimate, before the model is built; train.memory_check=false skips the check.
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^config key 'model.n_embd': training needs at least [\d.,]+ TiB "
                                          r"\([\d.,]+ TiB for the weights, gradients and AdamW state of 103\.12B "
                                          r"parameters, [\d.,]+ GiB of activations for micro-batch 8\) but this host's "
                                          r"available RAM is [\d.,]+ GiB; no micro-batch fits: a smaller model "
                                          r"\(model.n_embd, model.n_layer\) or more devices; train.memory_check=false "
                                          r"to try anyway$"):
        Trainer(_cfg(tmp_path / "a", tiny_data, "model.n_embd=65536"), progress=False)
    assert time.monotonic() - start < 10
    assert not list((tmp_path / "a").rglob("checkpoints"))


@pytest.mark.slow
def test_the_memory_estimate_is_a_hand_count_and_a_lower_bound_of_what_training_takes(tmp_path, tiny_data):
    from cocomix.device import estimate_training_memory
    from cocomix.params import ntp_params

    # By hand: d=512, 4 layers, vocab 512, 256-token sequences, fp32.
    params = ntp_params(512, 4, 512, 256)
    assert params == (512 + 256) * 512 + 4 * (12 * 512**2 + 13 * 512) + 2 * 512
    est = estimate_training_memory(params, 512, 4, 512, 256, bf16=False)
    assert est.fixed == 16 * params
    assert est.per_sequence == 256 * (68 * 512 * 4 + 8 * 512)  # fp32: 68 d bytes a token a layer, logits + grad
    assert estimate_training_memory(params, 512, 4, 512, 256, bf16=True).per_sequence == 256 * (34 * 512 * 4 + 8 * 512)
    # The largest micro-batch that fits divides the batch: room for 5 sequences -> 4 of a batch of 8.
    room = est.fixed + 5 * est.per_sequence
    assert est.largest_micro_batch(room, 8) == 4 and est.largest_micro_batch(est.fixed, 8) == 0
    assert est.largest_micro_batch(room, 5) == 5

    # A lower bound: what a real training run adds to its process's peak memory is more. The peak is
    # reset (/proc/self/clear_refs) after the imports, whose own peak (bytecode compiled on a fresh
    # clone's first import) could otherwise hide the training's.
    script = (
        "import json, sys, re\n"
        "from pathlib import Path\n"
        "from cocomix.config import load_config\n"
        "from cocomix.trainer import train\n"
        "cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))\n"
        "def kib(key):\n"
        "    return int(re.search(key + r':\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1))\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "before = kib('VmRSS')\n"
        "train(cfg, progress=False)\n"
        "print('GREW', (kib('VmHWM') - before) * 1024)\n"
    )
    args = tiny_overrides(tmp_path / "big", tiny_data, "train.tokens=4096", "checkpoint.every_tokens=1000000",
                          "eval.every_tokens=1000000", "eval.max_blocks=8", "model.n_embd=512", "model.n_head=8",
                          "model.n_layer=4", "train.block_size=256", "train.micro_batch_size=8",
                          "train.global_batch_size=8")
    out = subprocess.run([sys.executable, "-c", script, str(ROOT / "config/tiny.yaml"), json.dumps(args)],
                         env={**ENV, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grew = int(out.stdout.split("GREW ")[1].split()[0])
    assert est.need(8) < grew, (est.need(8), grew)
    print(f"estimate {est.need(8) / 2**20:.0f} MiB, measured growth {grew / 2**20:.0f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_it_ends_and_the_rerun_logs_what_an_uninterrupted_run_logs(tmp_path,
                                                                                                  tiny_data, sig):
    # SLURM's warning before preemption or the time limit (the profile's --signal: SIGUSR1), SIGTERM, or
    # Ctrl-C: the step in flight finishes, a checkpoint of that step is written (between the scheduled
    # ones), the run ends KILLED with exit 128 + signal, and the rerun's metrics.jsonl equals an
    # uninterrupted run's line for line (before: SIGTERM stopped without a checkpoint, losing up to
    # checkpoint.every_tokens of work; SIGUSR1 killed the process).
    common = ["train.tokens=40960", "train.log_every_steps=1", "eval.every_tokens=10240",
              "checkpoint.every_tokens=20480", "model.dropout=0.1"]
    tiny = str(ROOT / "config/tiny.yaml")
    ref = tiny_overrides(tmp_path / "ref", tiny_data, *common)
    subprocess.run(cli("train", "--config", tiny, "--no-progress", *ref), env=ENV, check=True, capture_output=True)
    args = tiny_overrides(tmp_path / "cut", tiny_data, *common)
    run_dir = load_config(ROOT / "config/tiny.yaml", args).run_dir
    proc = subprocess.Popen(cli("train", "--config", tiny, "--no-progress", *args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.is_file() else []
        if sum('"train/loss"' in x for x in lines) >= 13:  # past step 13, before the checkpoint at 20
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
    m = re.search(rf"^cocomix: stopped by {name} after step (\d+): checkpoint (step_\d+) written; the run is marked "
                  r"KILLED and resumes from its newest checkpoint$", err.strip().splitlines()[-1])
    assert m, err[-2000:]
    step = int(m.group(1))
    assert 13 <= step < 20 and m.group(2) == f"step_{step:07d}"
    assert [c.name for c in list_checkpoints(run_dir)] == [f"step_{step:07d}"]
    rerun = subprocess.run(cli("train", "--config", tiny, "--no-progress", *args), env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0 and f"resumed from {run_dir}/checkpoints/step_{step:07d}" in rerun.stdout, rerun.stderr

    def records(folder: Path) -> list[dict]:
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith(("tokens_per_s", "mfu"))} for r in rows]

    ref_dir = load_config(ROOT / "config/tiny.yaml", ref).run_dir
    assert records(run_dir) == records(ref_dir) and len(records(ref_dir)) >= 40
    a = load_file(str(list_checkpoints(ref_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_under_ddp_a_stop_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path, tiny_data):
    # A signal may reach one rank only (or the ranks at different steps): the flag is all-reduced at log
    # steps, so both ranks write the checkpoint of one step and end; the rerun resumes from it.
    extra = ["train.tokens=40960", "train.log_every_steps=2", "eval.every_tokens=20480", "checkpoint.every_tokens=40960"]
    args = tiny_overrides(tmp_path, tiny_data, *extra)
    run_dir = load_config(ROOT / "config/tiny.yaml", args).run_dir
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                "-m", "cocomix.cli", "train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *args]
    proc = subprocess.Popen(torchrun, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and sum('"train/loss"' in x for x in log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        ranks[int(env["RANK"])] = int(pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 only
    _, err = proc.communicate(timeout=180)
    # (after the workers' lines, torchrun reports the failed worker with its own traceback)
    assert proc.returncode != 0 and "Traceback" not in err.split("failed (exitcode: 138)")[0], err[-3000:]
    steps = {int(s) for s in re.findall(r"cocomix: stopped by SIGUSR1 after step (\d+): checkpoint step_\d+ written", err)}
    assert len(steps) == 1, err[-3000:]  # one step, said by both ranks
    (step,) = steps
    assert step % 2 == 0 and 5 <= step < 40
    assert [c.name for c in list_checkpoints(run_dir)] == [f"step_{step:07d}"]
    rerun = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and f"checkpoints/step_{step:07d}" in rerun.stdout, rerun.stderr[-3000:]
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 40
