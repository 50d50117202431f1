"""A fair answer (issue 29): compute-matched NTP arms (cocomix/compute.py, `dag.compute_matched`), equal
tuning of every method on a tuning split (cocomix/tune.py, `cocomix tune`, `dag.tuned`), and a DAG that
runs both (slow: it starts snakemake)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cocomix.compute import amortised_total, matched_tokens, matched_total, per_step_total, shares
from cocomix.config import ConfigError, load_config
from cocomix.dag import Dag
from cocomix.methods import get_method
from cocomix.plan import plan_runs
from cocomix.tune import study_config, tuned_overrides
from conftest import ROOT, tiny_overrides
from test_dag import smk, write_config


# ---------------------------------------------------------------- compute-matched arms: the plan

def test_compute_matched_plans_an_ntp_arm_per_method_and_seed_and_an_amortised_one_where_one_off_items_exist(tmp_path):
    path = write_config(tmp_path, dag={"methods": ["ntp", "kd", "pause", "cocomix"], "seeds": [0, 1],
                                       "method_seeds": {"kd": [0], "pause": [1]},
                                       "ablations": {"mix_only": {"concept.lam": 0.0}}, "compute_matched": True})
    runs = {r.name: r for r in plan_runs(path)}
    arms = sorted(n for n in runs if n.startswith("ntp@"))
    # pause reads no teacher, SAE or labels: its amortised total is its per-step one, so no second arm;
    # ablations get none (their Δ is against CoCoMix)
    assert arms == ["ntp@cocomix+-base-s0", "ntp@cocomix+-base-s1", "ntp@cocomix-base-s0", "ntp@cocomix-base-s1",
                    "ntp@kd+-base-s0", "ntp@kd-base-s0", "ntp@pause-base-s1"]
    arm = runs["ntp@cocomix+-base-s1"]
    assert (arm.method, arm.seed, arm.arm, arm.matched_run) == ("ntp", 1, "cocomix+", "cocomix-base-s1")
    cfg = arm.config(path)
    assert cfg.method == "ntp" and cfg.tracking.tags == {"matches": "cocomix+"}
    dag = Dag(path)
    exp = dag.exp
    final = f"{exp}/runs/{{}}/final_metrics.json"
    # the per-step arm waits for its run; the amortised one for every run sharing the one-off items
    assert dag.train_inputs("ntp@kd-base-s0") == [f"{exp}/data/manifest.json", final.format("kd-base-s0")]
    readers = ["kd-base-s0", "cocomix-base-s0", "cocomix-base-s1", "mix_only-base-s0", "mix_only-base-s1"]
    assert dag.matched_inputs("ntp@cocomix+-base-s1") == [final.format("cocomix-base-s1")] + [
        final.format(n) for n in readers if n != "cocomix-base-s1"]
    flags = dag.run_flags("ntp@cocomix+-base-s1")
    assert flags == (f" --match-flops {final.format('cocomix-base-s1')} --amortise-over "
                     + ",".join(dag.matched_inputs("ntp@cocomix+-base-s1")))
    assert dag.run_flags("ntp-base-s0") == "" and dag.run_flags("ntp@pause-base-s1").startswith(" --match-flops ")
    # SLURM limits and `cocomix plan` bound an arm's FLOPs by its method's (its budget is set at launch)
    assert dag.training_flops("ntp@cocomix-base-s0") == 4.0 * dag.training_flops("cocomix-base-s0")


@pytest.mark.parametrize("changes, message", [
    ({"teacher": {"path": "some/gpt2"}},
     r"^config key 'dag.compute_matched': the amortised arm of kd-base-s0 needs the teacher's training FLOPs, and "
     r"some/gpt2 is a given teacher; set teacher.training_flops .* or turn the option off$"),
    ({"dag": {"methods": ["kd", "cocomix"], "seeds": [0], "compute_matched": True}},
     r"^config key 'dag.compute_matched': the arms are NTP runs paired with NTP's seeds; dag.methods has no ntp$"),
], ids=["given-teacher-without-flops", "no-ntp"])
def test_compute_matched_on_a_config_that_cannot_support_it_is_one_line_naming_the_key(tmp_path, changes, message):
    changes.setdefault("dag", {"methods": ["ntp", "kd"], "seeds": [0], "compute_matched": True})
    with pytest.raises(ConfigError, match=message):
        plan_runs(write_config(tmp_path, **changes))
    if "teacher" in changes:  # with the teacher's FLOPs stated, it plans
        changes["teacher"]["training_flops"] = 1.5e18
        assert "ntp@kd+-base-s0" in {r.name for r in plan_runs(write_config(tmp_path, **changes))}


def _final(student, online, teacher=None, sae=None, labels=None):
    f = {"compute/student_flops": student, "compute/online_teacher_flops": online}
    for item, value in (("teacher_training", teacher), ("sae_training", sae), ("label_extraction", labels)):
        if value is not None:
            f[f"compute/{item}_flops"] = value
    return f


def test_matched_totals_and_budgets_equal_a_hand_count(tmp_path):
    # two CoCoMix seeds and an ablation with its own label cache share the teacher and the SAE; KD shares
    # the teacher only
    cocomix = [_final(10.0, 0.0, 120.0, 30.0, 60.0), _final(10.0, 0.0, 120.0, 30.0, 60.0)]
    ablation, kd = _final(9.0, 0.0, 120.0, 30.0, 24.0), _final(10.0, 5.0, 120.0)
    finals = cocomix + [ablation, kd]
    assert shares(finals) == {("teacher_training", 120.0): 4, ("sae_training", 30.0): 3,
                              ("label_extraction", 60.0): 2, ("label_extraction", 24.0): 1}
    assert per_step_total(kd) == 15.0
    assert amortised_total(cocomix[0], shares(finals)) == 10.0 + 120 / 4 + 30 / 3 + 60 / 2  # 80
    assert amortised_total(kd, shares(finals)) == 15.0 + 30.0
    paths = []
    for i, f in enumerate(finals):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(f))
    assert matched_total(paths[0]) == 10.0 and matched_total(paths[0], paths) == 80.0
    cfg = load_config(ROOT / ".test/config.yaml")  # 16 x 64 = 1024 tokens a step
    # whole steps nearest the total: 10.4 steps' FLOPs -> 10 steps, 10.6 -> 11; at least one step
    assert matched_tokens(cfg, 10.0 * 1024 * 10.4, 10.0) == 10 * 1024
    assert matched_tokens(cfg, 10.0 * 1024 * 10.6, 10.0) == 11 * 1024
    assert matched_tokens(cfg, 1.0, 1.0) == 1024
    with pytest.raises(ConfigError, match=r"^--match-flops: .*missing.json not found \(the matched run must finish first\)$"):
        matched_total(tmp_path / "missing.json")
    (tmp_path / "old.json").write_text(json.dumps({"val/loss": 1.0}))
    with pytest.raises(ConfigError, match=r"has no compute ledger \(compute/student_flops\); retrain that run$"):
        matched_total(tmp_path / "old.json")


# ---------------------------------------------------------------- equal tuning: knobs and studies

def test_every_method_tunes_its_own_knobs_and_tune_space_changes_a_range_key_by_key(tmp_path):
    cfg = load_config(write_config(tmp_path, dag={"methods": ["ntp", "kd"], "seeds": [0]},
                                   tune={"space": {"kd": {"kd.lam": {"type": "float", "low": 0.05, "high": 0.5}}}}))
    spaces = {m: get_method(m).tune_space(cfg) for m in ("ntp", "kd", "pause", "kd_pause", "cocomix")}
    common = {"train.lr", "train.warmup_steps"}
    assert set(spaces["ntp"]) == common
    assert set(spaces["kd"]) == common | {"kd.lam", "kd.temperature"}
    assert set(spaces["pause"]) == common | {"concept.insert_layer"}
    assert set(spaces["kd_pause"]) == common | {"kd.lam", "kd.temperature", "concept.insert_layer"}
    assert set(spaces["cocomix"]) == common | {"concept.lam", "concept.k", "concept.insert_layer"}
    lr = spaces["ntp"]["train.lr"]
    assert (lr.low, lr.high, lr.log) == (3e-3 / 4, 3e-3 * 4, True)  # x1/4 to x4 around train.lr
    assert (spaces["cocomix"]["concept.insert_layer"].low, spaces["cocomix"]["concept.insert_layer"].high) == (1, 1)
    from cocomix.tune import method_space
    lam = method_space(cfg, "kd")["kd.lam"]
    assert (lam.low, lam.high, lam.log) == (0.05, 0.5, False)
    assert method_space(cfg, "kd")["kd.temperature"].high == 4.0  # the other knobs as they were


def test_every_methods_study_has_the_same_budget_and_scores_on_the_tuning_split(tmp_path):
    path = write_config(tmp_path, dag={"methods": ["ntp", "kd", "cocomix"], "seeds": [0], "tuned": True},
                        tune={"n_trials": 3, "tokens": 8192, "seed": 7})
    studies = {m: study_config(path, m) for m in ("ntp", "kd", "cocomix")}
    same = {(c.sweep.n_trials, c.sweep.tokens, c.sweep.sampler, c.sweep.seed, c.sweep.pruner) for c in studies.values()}
    assert same == {(3, 8192, "tpe", 7, "none")}
    for method, c in studies.items():
        assert c.sweep.method == method and c.eval.split == "tune" and c.sweep.study == f"ci-tune-{method}"
        assert set(c.sweep.enqueue[0]) == set(c.sweep.space)  # the first trial: the configured values
    assert studies["kd"].sweep.enqueue[0] == {"train.lr": 3e-3, "train.warmup_steps": 5, "kd.lam": 0.1,
                                              "kd.temperature": 1.0}
    dag = Dag(path)
    assert dag.run_flags("kd-base-s0") == f" --tuned {dag.exp}/tuning/kd/best.json"
    assert dag.train_inputs("kd-base-s0")[-1] == f"{dag.exp}/tuning/kd/best.json"
    assert dag.tune_fingerprint("kd") != dag.tune_fingerprint("ntp")
    with pytest.raises(ConfigError, match=r"^config key 'tune.space.pause': expected a method of dag.methods"):
        study_config(write_config(tmp_path, dag={"methods": ["ntp"], "seeds": [0]},
                                  tune={"space": {"pause": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}}), "ntp")


def test_tuned_values_are_overrides_and_a_study_without_a_result_is_one_line(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"study": "s", "params": {"train.lr": 0.004, "kd.lam": 0.2}}))
    assert tuned_overrides(best) == ["kd.lam=0.2", "train.lr=0.004"]
    best.write_text(json.dumps({"study": "s", "params": {}}))
    with pytest.raises(ConfigError, match=r"^--tuned .*best.json: no tuned values \(no trial of study 's' completed\)$"):
        tuned_overrides(best)
    with pytest.raises(ConfigError, match=r"^--tuned .*nope.json: not found; run `cocomix tune`"):
        tuned_overrides(tmp_path / "nope.json")


# ---------------------------------------------------------------- the tuning split

def _copy_with_other_val(tiny_data: Path, dest: Path) -> Path:
    """The data folder with every validation shard's tokens replaced (same size), its stamp dropped."""
    shutil.copytree(tiny_data, dest)
    (dest / "manifest.verified.json").unlink(missing_ok=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for shard in manifest["splits"]["val"]["shards"]:
        tokens = np.memmap(dest / shard["file"], dtype=dtype, mode="r+")
        tokens[:] = (np.arange(len(tokens)) * 7 + 3) % manifest["vocab_size"]
        tokens.flush()
    return dest


def test_a_tuning_run_never_reads_the_validation_split_and_trains_without_the_tuning_blocks(tiny_data, tmp_path):
    from cocomix.data import DataError
    from cocomix.trainer import Trainer, train

    def run(data_dir, root, *extra):
        cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(root, data_dir, "train.tokens=4096", "eval.every_tokens=2048",
                                                                    "checkpoint.every_tokens=4096", "eval.split=tune",
                                                                    "eval.tune_blocks=16", *extra))
        final = train(cfg, progress=False)
        return final, [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]

    final, log = run(tiny_data, tmp_path / "a")
    other = _copy_with_other_val(tiny_data, tmp_path / "other")
    final_b, log_b = run(other, tmp_path / "b")
    val = lambda records: [r["val/loss"] for r in records if "val/loss" in r]  # noqa: E731
    assert final["eval_split"] == "tune" and len(val(log)) == 2 and val(log) == val(log_b)  # bit for bit
    with pytest.raises(DataError, match="sha256"):  # the same data read for validation is refused
        train(load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / "c", other, "train.tokens=2048")), progress=False)
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / "d", tiny_data, "eval.split=tune", "eval.tune_blocks=16"))
    trainer = Trainer(cfg, progress=False)
    n = len(trainer.train_blocks) + 1 + len(trainer.val_blocks)  # the tuning split, a gap of one block, the rest
    assert len(trainer.val_blocks) == 16 and trainer.val_blocks.offset == n - 16 and trainer.train_blocks.offset == 0
    assert np.array_equal(trainer.val_blocks[0], trainer.train_blocks.blocks[n - 16])
    assert trainer.order.take(0, 2 * n).max() < n - 17  # no training block is in the split or the gap
    with pytest.raises(ConfigError, match=r"^config key 'eval.tune_blocks': a tuning split of 100000 blocks is more than "
                                          r"a quarter of the \d+ training blocks of .*; expected at most \d+$"):
        Trainer(load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / "e", tiny_data, "eval.split=tune",
                                                                      "eval.tune_blocks=100000")), progress=False)


# ---------------------------------------------------------------- the DAG, both at once (slow)

@pytest.mark.slow
def test_a_dag_with_compute_matched_arms_and_equal_tuning(tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["dag"] = {"methods": ["ntp", "kd", "cocomix"], "seeds": [0], "ablations": {}, "teacher": {"model.n_layer": 3},
                  "compute_matched": True, "tuned": True, "evaluate": False}
    cfg["tune"] = {"n_trials": 2, "tokens": 8192, "n_startup_trials": 1}
    cfg["eval"]["tune_blocks"] = 16
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / "results" / "ci"
    final = {p.parent.name: json.loads(p.read_text()) for p in (exp / "runs").glob("*/final_metrics.json")}
    # Equal tuning: the same number of trials for every method, each scored on the tuning split
    best = {m: json.loads((exp / "tuning" / m / "best.json").read_text()) for m in ("ntp", "kd", "cocomix")}
    assert {(b["trials"], b["complete"] + b["pruned"] + b["failed"], b["tokens_per_trial"]) for b in best.values()} == {(2, 2, 8192)}
    trials = list((exp / "sweeps").glob("ci-tune-*/trials/trial-*/final_metrics.json"))
    assert len(trials) == 6 and {json.loads(t.read_text())["eval_split"] for t in trials} == {"tune"}
    for m in ("ntp", "kd", "cocomix"):  # the main runs trained with the chosen values
        run_cfg = yaml.safe_load((exp / "runs" / f"{m}-base-s0" / "config.yaml").read_text())
        assert run_cfg["train"]["lr"] == best[m]["params"]["train.lr"] and final[f"{m}-base-s0"]["eval_split"] == "val"
    tuning = (exp / "tables" / "tuning.md").read_text()
    assert all(f"train.lr={best[m]['params']['train.lr']:.3g}" in tuning for m in best)
    # Compute-matched arms: each spends its run's FLOPs, within half a step's
    for arm, run, amortise in (("ntp@kd-base-s0", "kd-base-s0", False), ("ntp@kd+-base-s0", "kd-base-s0", True),
                               ("ntp@cocomix-base-s0", "cocomix-base-s0", False),
                               ("ntp@cocomix+-base-s0", "cocomix-base-s0", True)):
        f, a = final[run], final[arm]
        target = f["compute/student_flops"] + f["compute/online_teacher_flops"]
        if amortise:  # by hand: the teacher's training over KD and CoCoMix, the SAE and labels over CoCoMix alone
            target += f["compute/teacher_training_flops"] / 2
            target += f.get("compute/sae_training_flops", 0) + f.get("compute/label_extraction_flops", 0)
        half_step = a["flops_per_token"] * 1024 / 2
        assert abs(a["compute/student_flops"] - target) <= half_step, (arm, a["compute/student_flops"], target)
        assert a["tokens_seen"] > f["tokens_seen"]
    import csv
    with open(exp / "tables" / "main.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {"Δ at equal FLOPs", "Δ at equal FLOPs, amortised", "MDE at equal FLOPs"} <= set(table[0])
    rows = {r["method"]: r for r in table}
    for m in ("kd", "cocomix"):
        delta = float(rows[m]["Δ at equal FLOPs"])
        assert delta == pytest.approx(final[f"{m}-base-s0"]["val/loss"] - final[f"ntp@{m}-base-s0"]["val/loss"], abs=1e-4)
    compute = (exp / "tables" / "compute.csv").read_text()
    assert "ntp@cocomix+ (base)" in compute


# ---------------------------------------------------------------- init seeds and data-order seeds

def test_data_seeds_cross_the_seeds_and_pair_runs_by_init_and_data_order(tmp_path):
    path = write_config(tmp_path, dag={"methods": ["ntp", "cocomix"], "seeds": [0, 1], "data_seeds": [5, 6],
                                       "ablations": {"mix_only": {"concept.lam": 0.0}}, "ablation_seeds": [0]})
    runs = {r.name: r for r in plan_runs(path)}
    assert sorted(runs) == sorted([f"{m}-base-s{s}-d{d}" for m in ("ntp", "cocomix") for s in (0, 1) for d in (5, 6)] + [
        "mix_only-base-s0-d5", "mix_only-base-s0-d6"])
    a, b = runs["cocomix-base-s1-d5"].config(path), runs["cocomix-base-s0-d5"].config(path)
    assert (a.seed, a.train.data_seed, b.seed, b.train.data_seed) == (1, 5, 0, 5)


def test_a_fixed_data_seed_keeps_the_data_order_while_the_init_seed_changes_the_weights(tiny_data, tmp_path):
    from cocomix.trainer import Trainer

    def trainer(seed, data_seed):
        cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path / f"{seed}-{data_seed}", tiny_data,
                                                                    f"seed={seed}", f"train.data_seed={data_seed}"))
        return Trainer(cfg, progress=False)

    base, other_init, other_data = trainer(0, 3), trainer(1, 3), trainer(0, 4)
    order = lambda t: t.order.take(0, 64)  # noqa: E731
    weights = lambda t: t.model.transformer.wte.weight.detach()  # noqa: E731
    assert np.array_equal(order(base), order(other_init)) and not np.array_equal(order(base), order(other_data))
    assert not np.array_equal(weights(base), weights(other_init)) and np.array_equal(weights(base), weights(other_data))


def test_the_seed_variance_split_equals_the_known_components_of_a_constructed_grid():
    from evals.report.seeds import variance_components

    a, b = np.array([0.0, 0.3, -0.1]), np.array([0.2, -0.2])  # init and data-order effects, no residual
    grid = 4.0 + a[:, None] + b[None, :]
    sd = variance_components(grid)
    assert sd["init"] == pytest.approx(a.std(ddof=1)) and sd["data"] == pytest.approx(b.std(ddof=1))
    assert sd["residual"] == pytest.approx(0.0, abs=1e-12) and sd["total"] == pytest.approx(grid.std(ddof=1))
    # with a residual: MS_res is the mean square of the interaction, and it is taken out of both axes
    e = np.array([[0.05, -0.05], [-0.05, 0.05], [0.0, 0.0]])
    sd = variance_components(grid + e)
    ms_res = (e ** 2).sum() / 2  # e already has zero row and column means
    assert sd["residual"] == pytest.approx(np.sqrt(ms_res))
    assert sd["init"] == pytest.approx(np.sqrt(a.std(ddof=1) ** 2 - ms_res / 2))
    assert sd["data"] == pytest.approx(np.sqrt(b.std(ddof=1) ** 2 - ms_res / 3))
    one_axis = variance_components(grid[:, :1])  # one data seed: the init's spread alone
    assert one_axis["init"] == pytest.approx(a.std(ddof=1)) and one_axis["data"] is None


def test_the_seed_variance_table_splits_methods_and_their_differences_to_ntp(tmp_path):
    from evals.report.runs import Run
    from evals.report.seeds import seed_variance_table

    a, b = [0.0, 0.3, -0.1], [0.2, -0.2]

    def run(method, i, j, extra=0.0):
        return Run(f"{method}-base-s{i}-d{j}", method, "base", i, None, tmp_path, None,
                   {"val/loss": 4.0 + a[i] + b[j] + extra}, [], data_seed=j)

    runs = [run("ntp", i, j) for i in range(3) for j in range(2)] + [
        run("cocomix", i, j, extra=0.1 * i) for i in range(3) for j in range(2)]  # Δ: 0.1 x init seed
    table = seed_variance_table(runs)
    rows = {(r[1], r[2]): r for r in table.rows}
    assert rows[("ntp", "held-out loss")][3:5] == ["3", "2"]
    assert rows[("ntp", "held-out loss")][6].mean == pytest.approx(np.std(a, ddof=1))
    delta = rows[("cocomix", "Δ vs NTP")]
    assert delta[6].mean == pytest.approx(0.1) and delta[7].mean == pytest.approx(0.0, abs=1e-9)
