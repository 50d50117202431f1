"""train.parallel (cocomix/parallel.py): FSDP2 trains like DDP and its checkpoints resume under either
setting on another number of processes; activation checkpointing changes memory, not the run."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli
from cocomix.checkpoints import list_checkpoints
from cocomix.config import load_config
from cocomix.device import estimate_training_memory

ENV = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# CoCoMix (the concept path and its held-out metrics, which run outside forward()), 20 steps of 16
# sequences, 2 accumulation steps per process on 2 processes, a checkpoint at step 10 and 20.
RUN = ["method=cocomix", "train.tokens=20480", "train.log_every_steps=1", "train.global_batch_size=16",
       "train.micro_batch_size=4", "train.warmup_steps=2", "eval.every_tokens=10240", "eval.max_blocks=37",
       "checkpoint.every_tokens=10240", "checkpoint.keep_last=0"]


def _train(overrides: list[str], procs: int, port: int) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *overrides]
    cmd = cli(*args) if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                         str(procs), "--master_port", str(port), "-m", "cocomix.cli", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(overrides: list[str]) -> dict[int, dict]:
    run_dir = load_config(ROOT / "config/tiny.yaml", overrides).run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


def _close(a: dict[int, dict], b: dict[int, dict], steps, key: str, tol: float = 1e-5) -> float:
    worst = max(abs(a[s][key] - b[s][key]) for s in steps)
    assert worst < tol, (key, worst)
    return worst


@pytest.mark.slow
def test_fsdp_matches_ddp_and_its_checkpoints_resume_on_another_world_size(tmp_path, concept_cache):
    _, base = concept_cache
    over = {name: [*base, f"run_name=parallel-{name}", *RUN, *extra] for name, extra in {
        "ddp": [], "fsdp": ["train.parallel=fsdp"]}.items()}
    _train(over["ddp"], 2, 29541)
    _train(over["fsdp"], 2, 29543)
    ddp, fsdp = _log(over["ddp"]), _log(over["fsdp"])
    steps = range(1, 21)
    assert all("train/loss" in fsdp[s] for s in steps) and max(fsdp) == 20
    _close(ddp, fsdp, steps, "train/loss")
    _close(ddp, fsdp, steps, "train/grad_norm", 1e-4)
    _close(ddp, fsdp, (10, 20), "val/loss")
    _close(ddp, fsdp, (10, 20), "val/concept_loss")  # predict_concepts gathers the sharded weights
    # The FSDP checkpoint: full weights in model.safetensors (the same as DDP's to rounding), the
    # optimizer as a torch.distributed.checkpoint folder of 2 shards, everything sealed.
    f_ckpt = list_checkpoints(load_config(ROOT / "config/tiny.yaml", over["fsdp"]).run_dir)[0]
    d_ckpt = list_checkpoints(load_config(ROOT / "config/tiny.yaml", over["ddp"]).run_dir)[0]
    assert f_ckpt.name == d_ckpt.name == "step_0000010"
    shards = sorted(p.name for p in (f_ckpt / "trainer/optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    assert not (f_ckpt / "trainer/optimizer.pt").exists()
    sealed = json.loads((f_ckpt / "checkpoint.json").read_text())["files"]
    assert "trainer/optimizer/__1_0.distcp" in sealed and "model.safetensors" in sealed
    assert json.loads((f_ckpt / "config.json").read_text())["architectures"] == ["CocomixForCausalLM"]
    from safetensors.torch import load_file
    fw, dw = load_file(f_ckpt / "model.safetensors"), load_file(d_ckpt / "model.safetensors")
    assert fw.keys() == dw.keys() and max((fw[k] - dw[k]).abs().max().item() for k in fw) < 1e-5
    # Resumed from step 10 on ONE process (FSDP's folder read without a process group), under fsdp and
    # under ddp, and DDP's optimizer.pt resumed by FSDP on 2 processes: steps 11-20 as the runs above.
    for name, procs, parallel, ckpt, ref in (("fsdp-to-1", 1, "fsdp", f_ckpt, fsdp), ("fsdp-to-ddp", 1, "ddp", f_ckpt, fsdp),
                                             ("ddp-to-fsdp", 2, "fsdp", d_ckpt, ddp)):
        o = [*base, f"run_name=parallel-{name}", *RUN, f"train.parallel={parallel}", f"train.resume={ckpt}"]
        _train(o, procs, 29545)
        resumed = _log(o)
        assert min(s for s in resumed if "train/loss" in resumed[s]) == 11
        _close(ref, resumed, range(11, 21), "train/loss")
        _close(ref, resumed, (20,), "val/loss")


@pytest.mark.slow
def test_activation_checkpointing_trains_to_the_same_losses(tmp_path, tiny_data):
    from conftest import tiny_overrides

    common = ["train.tokens=8192", "train.log_every_steps=1", "model.dropout=0.1"]
    runs = {}
    for name, extra in {"plain": [], "recompute": ["train.activation_checkpointing=true"]}.items():
        o = tiny_overrides(tmp_path / name, tiny_data, *common, *extra)
        _train(o, 1, 0)
        runs[name] = _log(o)
    _close(runs["plain"], runs["recompute"], range(1, 9), "train/loss", 1e-6)
    from cocomix.trainer import Trainer  # the switch reaches the blocks (each recomputes in backward)

    for on in (False, True):
        cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(
            tmp_path / f"check-{on}", tiny_data, *common, f"train.activation_checkpointing={str(on).lower()}"))
        trainer = Trainer(cfg, progress=False)
        assert [b.gradient_checkpointing for b in trainer.model.transformer.h] == [on] * cfg.model.n_layer
        trainer.run_lock.close()
    # An execution setting: the same run folder identity (fingerprint) as without it.
    a = json.loads((list_checkpoints(load_config(ROOT / "config/tiny.yaml", tiny_overrides(
        tmp_path / "plain", tiny_data, *common)).run_dir)[-1] / "checkpoint.json").read_text())
    b = json.loads((list_checkpoints(load_config(ROOT / "config/tiny.yaml", tiny_overrides(
        tmp_path / "recompute", tiny_data, *common)).run_dir)[-1] / "checkpoint.json").read_text())
    assert a["config_fingerprint"] == b["config_fingerprint"]


def test_memory_estimate_divides_the_fixed_part_over_shards_and_recompute_keeps_one_block():
    params, d, layers, vocab, t = 3_000_000_000, 3072, 28, 50304, 2048
    full = estimate_training_memory(params, d, layers, vocab, t, bf16=True)
    sharded = estimate_training_memory(params, d, layers, vocab, t, bf16=True, shards=8)
    assert full.fixed == 16 * params and sharded.fixed == 2 * params  # 48 GB -> 6 GB a GPU
    assert sharded.per_sequence == full.per_sequence
    recompute = estimate_training_memory(params, d, layers, vocab, t, bf16=True, recompute=True)
    assert full.per_sequence == t * (34 * d * layers + 8 * vocab)
    assert recompute.per_sequence == t * (layers * d * 2 + 34 * d + 8 * vocab)


def test_parallel_is_a_checked_execution_key(tmp_path):
    from cocomix.config import ConfigError, fingerprint

    a = load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}"])
    b = load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "train.parallel=fsdp",
                                                "train.activation_checkpointing=true"])
    assert fingerprint(a, ["train"]) == fingerprint(b, ["train"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(ROOT / "config/tiny.yaml", [f"results_dir={tmp_path}", "train.parallel=zero3"])


def test_the_3b_config_states_a_memory_plan_that_fits_only_sharded():
    from cocomix.dag import Dag

    gib = 2**30
    eight, one = Dag(ROOT / "config/paper-3b.yaml", train_gpus=8), Dag(ROOT / "config/paper-3b.yaml", train_gpus=1)
    assert eight.config("ntp-3B-s22").train.parallel == "fsdp"
    assert round(eight.memory_per_gpu("ntp-3B-s22") / gib, 1) == 8.5  # the figures its comment states
    assert round(eight.memory_per_gpu("cocomix-3B-s22") / gib, 1) == 8.7
    assert one.memory_per_gpu("ntp-3B-s22") / gib > 47.7  # unsharded: the state alone is 16 B x 3.2B


@pytest.mark.slow
def test_label_extraction_on_two_processes_writes_the_one_process_cache_byte_for_byte(tmp_path, concept_cache):
    """Chunks dealt round-robin over 2 gloo processes (13 chunks of 1000 train blocks: the last round
    has one); a 2-process extraction killed after a chunk and finished on 1 process is identical too."""
    _, base = concept_cache
    dirs = {name: tmp_path / name for name in ("one", "two", "cut")}
    common = [*base, "concept.extract_batch_size=1000"]

    def extract(name: str, procs: int, env=ENV) -> subprocess.CompletedProcess:
        args = ["extract-concepts", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *common,
                f"concept.cache_dir={dirs[name]}"]
        cmd = cli(*args) if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                             str(procs), "--master_port", "29547", "-m", "cocomix.cli", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    for name, procs in (("one", 1), ("two", 2)):
        proc = extract(name, procs)
        assert proc.returncode == 0, proc.stderr[-3000:]
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps([{"site": "labels.chunk", "hit": 4}]))  # 4th chunk a process writes: round 4
    killed = extract("cut", 2, {**ENV, "COCOMIX_FAULTS": str(plan)})
    assert killed.returncode != 0 and json.loads(plan.read_text()) == []
    assert not (dirs["cut"] / "manifest.json").exists()
    recorded = json.loads((dirs["cut"] / "progress.json").read_text())["blocks_done"]["train"]
    assert recorded == 6000, recorded  # 3 whole rounds of 2 chunks; the killed round is redone
    resumed = extract("cut", 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for split in ("train", "val"):
        one = (dirs["one"] / f"{split}.labels.bin").read_bytes()
        assert len(one) > 0
        assert (dirs["two"] / f"{split}.labels.bin").read_bytes() == one, split
        assert (dirs["cut"] / f"{split}.labels.bin").read_bytes() == one, split
    manifests = [json.loads((dirs[n] / "manifest.json").read_text()) for n in dirs]
    assert manifests[0]["splits"] == manifests[1]["splits"] == manifests[2]["splits"]
    assert not any(p.name.endswith(".partial") for d in dirs.values() for p in d.iterdir())
