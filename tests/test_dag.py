"""The Snakemake DAG for real (tiny `.test/` config): outputs, idempotence, targeted reruns,
resume after a kill, and dry runs of the gpu/slurm profiles and the paper's full plan (slow: each
starts snakemake). Fast: the plan (cocomix/plan.py) and what the rules ask of it (cocomix/dag.py)."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cocomix.config import ConfigError, split_batch
from cocomix.dag import Dag
from cocomix.plan import plan_runs
from conftest import ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def smk(workdir: Path, config: Path, *args: str, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--config", f"config={config}", *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    """One full run of the CI DAG, shared by the tests below."""
    work = tmp_path_factory.mktemp("dag")
    proc = smk(work, ROOT / ".test/config.yaml", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


@pytest.mark.slow
def test_full_dag_writes_tables_and_plots(dag_run):
    exp = dag_run / "results" / "ci"
    for table in ("main", "sample_efficiency", "ablations"):
        for ext in ("md", "tex", "csv"):
            assert (exp / "tables" / f"{table}.{ext}").stat().st_size > 0
    assert (exp / "plots" / "heldout_loss_base.png").stat().st_size > 1000
    main = (exp / "tables" / "main.csv").read_text().splitlines()
    # One row per method with both seeds, each row traceable to its two MLflow runs.
    for method in ("ntp", "kd", "pause", "cocomix"):
        row = next(line for line in main if line.startswith(f"base,{method},2,"))
        assert len(row.rsplit(",", 1)[1].split()) == 2
    ablations = (exp / "tables" / "ablations.csv").read_text()
    assert "base,act_labels,1," in ablations and "base,mix_only,1," in ablations
    # The teacher, the SAE, one label cache per scoring, and an evaluation of every checkpoint.
    assert (exp / "runs" / "teacher" / "final_metrics.json").exists() and (exp / "sae" / "metrics.json").exists()
    assert {p.name for p in (exp / "concepts").iterdir()} == {"attribution-sequence_mean-k4", "activation-sequence_mean-k4"}
    for run in (exp / "runs").iterdir():
        if run.name != "teacher":
            assert all((c / "eval.json").exists() for c in (run / "checkpoints").iterdir()), run


@pytest.mark.slow
def test_every_heavy_rule_leaves_a_benchmark_and_the_report_page_shows_tables_and_plots(dag_run):
    exp = dag_run / "results" / "ci"
    bench = exp / "benchmarks"
    # Snakemake's benchmark TSV (s, max_rss, ...) per job of every heavy rule: the figures that size
    # SLURM runtime and mem_mb.
    # (no eval/*.tsv: each training job evaluates its own checkpoints, dag.evaluate_in_train)
    expected = {"prepare_data.tsv", "train_sae.tsv", "train/teacher.tsv", "train/cocomix-base-s0.tsv",
                "extract_concepts/attribution-sequence_mean-k4.tsv"}
    found = {str(p.relative_to(bench)) for p in bench.rglob("*.tsv")}
    assert expected <= found, expected - found
    header, row = (bench / "train/ntp-base-s0.tsv").read_text().splitlines()[:2]
    assert header.split("\t")[:3] == ["s", "h:m:s", "max_rss"] and float(row.split("\t")[0]) > 0
    html = dag_run / "report.html"
    proc = smk(dag_run, ROOT / ".test/config.yaml", "--report", str(html))  # no --cores, as users type it
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = html.read_text(errors="replace")
    for name in ("main.csv", "sample_efficiency.csv", "ablations.csv", "heldout_loss_base.png", "downstream_base.png"):
        assert name in page, name


@pytest.mark.slow
def test_dag_runs_carry_mlflows_standard_tags_and_ablations_their_name(dag_run):
    from mlflow.tracking import MlflowClient

    exp = dag_run / "results" / "ci"
    client = MlflowClient(tracking_uri=f"sqlite:///{exp.parent / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=200)
    tags = {r.info.run_name: r.data.tags for r in runs}
    assert tags["mix_only-base-s0"]["ablation"] == "mix_only" and tags["mix_only-base-s0"]["method"] == "cocomix"
    assert tags["act_labels-base-s0"]["ablation"] == "act_labels"
    assert tags["cocomix-base-s0"]["ablation"] == "none" and tags["ntp-base-s1"]["ablation"] == "none"
    for name in ("cocomix-base-s0", "mix_only-base-s0"):
        assert tags[name]["mlflow.source.name"] == "cocomix train" and tags[name]["mlflow.user"]
        assert len(tags[name]["mlflow.source.git.commit"]) in (7, 40) or tags[name]["mlflow.source.git.commit"] == "unknown"


@pytest.mark.slow
def test_the_documented_filter_shows_exactly_the_student_runs(dag_run):
    """docs/tracking.md: `tags.role = 'student'` in the runs table (here MLflow's search API) leaves out the
    teacher, the SAE, the ablations, the report and any sweep trial; with `tags.role = 'ablation'`, the
    ablations. (A client, not mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for later tests.)"""
    from mlflow.tracking import MlflowClient

    exp = dag_run / "results" / "ci"
    client = MlflowClient(tracking_uri=f"sqlite:///{exp.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ci")

    def search(where):
        return client.search_runs([experiment.experiment_id], filter_string=where, max_results=500)

    planned = plan_runs(ROOT / ".test/config.yaml")
    assert sorted(r.info.run_name for r in search("tags.role = 'student'")) == sorted(
        r.name for r in planned if r.ablation is None)
    assert sorted(r.info.run_name for r in search("tags.role = 'ablation'")) == sorted(r.name for r in planned if r.ablation)
    others = search("tags.role != 'student' and tags.role != 'ablation'")
    assert {r.data.tags["role"] for r in others} >= {"teacher", "sae", "report"}
    note = experiment.tags["mlflow.note.content"]  # the UI's experiment description
    assert "tags.role = 'student'" in note and "group by tags.method" in note


@pytest.mark.slow
def test_every_metric_the_dag_logs_is_documented(dag_run):
    """docs/tracking.md's metrics table names every metric key a DAG run logs to MLflow (`<task>`,
    `<metric>` and `<name>` stand for any name; `_stderr` follows any lm-eval value)."""
    from mlflow.tracking import MlflowClient

    exp = dag_run / "results" / "ci"
    client = MlflowClient(tracking_uri=f"sqlite:///{exp.parent / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=500)
    logged = {k for r in runs for k in r.data.metrics}
    table = (ROOT / "docs/tracking.md").read_text().split('<a id="metrics"></a>')[1].split("\n\n", 2)[1]
    names = {n for row in table.splitlines() if row.startswith("| `") for n in re.findall(r"`([^`]+)`", row.split("|")[1])}
    patterns = [re.compile("^" + re.sub(r"<[a-z]+>", "[^/]+", re.escape(n).replace(r"\<", "<").replace(r"\>", ">"))
                           + "(_stderr)?$") for n in names]
    undocumented = sorted(k for k in logged if not any(p.match(k) for p in patterns))
    assert logged and not undocumented, undocumented


@pytest.mark.slow
def test_second_invocation_does_nothing(dag_run):
    proc = smk(dag_run, ROOT / ".test/config.yaml", "--cores", "2", "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_sweep_target_reuses_the_dags_data_teacher_sae_and_labels(dag_run):
    """`snakemake sweep` is not part of `all`; after the DAG, it plans the sweep job alone."""
    proc = smk(dag_run, ROOT / ".test/config.yaml", "--cores", "2", "-n", "sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned_jobs(proc.stdout) == {("sweep", None)}


@pytest.mark.slow
def test_changing_one_setting_reruns_only_what_reads_it(dag_run, tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg.setdefault("kd", {})["lam"] = 0.5  # no NTP run reads kd.*
    other = tmp_path / "kd.yaml"
    other.write_text(yaml.safe_dump(cfg))
    proc = smk(dag_run, other, "--cores", "2", "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The KD branch (its two training runs, which evaluate their checkpoints too) and the report; nothing else.
    assert planned_jobs(proc.stdout) == {("train", "kd-base-s0"), ("train", "kd-base-s1"), ("report", None),
                                         ("all", None)}
    cfg["train"]["lr"] = 1.0e-3  # every run reads train.*
    other.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(smk(dag_run, other, "--cores", "2", "-n").stdout)
    assert ("train", "ntp-base-s0") in jobs and ("train", "cocomix-base-s1") in jobs
    # The teacher is an NTP run too, so its SAE and labels follow; the data do not depend on train.*.
    assert ("train", "teacher") in jobs and ("train_sae", None) in jobs
    assert "prepare_data" not in {rule for rule, _ in jobs}


def planned_jobs(dry_run: str) -> set[tuple[str, str | None]]:
    """(rule, run wildcard) of every job a dry run would execute."""
    import re

    jobs, rule = set(), None
    for line in dry_run.splitlines():
        m = re.match(r"\s*(?:local)?rule (\w+):", line)
        if m:
            if rule is not None:
                jobs.add((rule, None))
            rule = m.group(1)
            continue
        m = re.match(r"\s*wildcards: .*run=([^,\s]+)", line)
        if m and rule is not None:
            jobs.add((rule, m.group(1)))
            rule = None
        elif line.strip().startswith(("Job stats", "job ")) and rule is not None:
            jobs.add((rule, None))
            rule = None
    if rule is not None:
        jobs.add((rule, None))
    return jobs


@pytest.mark.slow
def test_killed_snakemake_resumes_training(tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["dag"] = {"methods": ["ntp"], "seeds": [0]}
    cfg["train"]["tokens"] = 131072  # long enough to kill in the middle
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path), "--config", f"config={config}", "--cores", "2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = tmp_path / "results" / "ci" / "runs" / "ntp-base-s0" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.startswith("step_") and "tmp" not in p.name
                                                                  for p in ckpts.iterdir())):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its training job, as a preemption would
    proc.wait()
    assert not (ckpts.parent / "final_metrics.json").exists()
    # A hard kill leaves Snakemake's lock behind: the documented recovery is --unlock, then rerun.
    unlock = subprocess.run(cmd + ["--unlock"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    rerun = subprocess.run(cmd + ["--rerun-incomplete"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (tmp_path / "results" / "ci" / "logs" / "train" / "ntp-base-s0.log").read_text()
    assert "resumed from" in log and "step_00000" in log


def _dry_run(tmp_path, config, *args):
    return subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--config", f"config={config}", "-n", *args],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("config", [".test/config.yaml", "config/tiny.yaml", "config/gutenberg.yaml"])
def test_slurm_profile_plans_training_jobs_whose_batch_splits_over_eight_gpus(tmp_path, config):
    # The profile gives every training job 8 GPUs; gutenberg's global batch 64 = micro-batch 64 and
    # tiny's 32 = 32 could not be split over 8 ranks by the old trainer (every job failed at start).
    proc = _dry_run(tmp_path, ROOT / config, "--profile", "slurm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-m cocomix.launch --gpus 8 train" in proc.stdout
    plan = Dag(ROOT / config, train_gpus=8)
    for name in [*plan.runs, *(["teacher"] if plan.teacher else [])]:
        t = plan.config(name).train
        micro, accum = split_batch(t.global_batch_size, t.micro_batch_size, 8)
        assert micro * accum * 8 == t.global_batch_size and micro <= t.micro_batch_size


@pytest.mark.slow
def test_a_batch_the_profiles_gpus_cannot_split_fails_at_planning_in_one_line(tmp_path):
    config = tmp_path / "b12.yaml"
    config.write_text(yaml.safe_dump({"experiment": "b12", "train": {"global_batch_size": 12, "micro_batch_size": 4}}))
    proc = _dry_run(tmp_path, config, "--profile", "slurm")
    assert proc.returncode != 0
    assert re.search(r"^cocomix: error: run [\w.-]+: train.global_batch_size=12 cannot be split evenly over 8 processes, "
                     r"the GPUs of each training job \(the profile's node_gpus x train:nodes, or train:gpu\); set "
                     r"train.global_batch_size to a multiple of 8 or lower train:gpu$", proc.stderr, re.M), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "File " not in proc.stderr


@pytest.mark.slow
def test_gpu_profile_with_four_gpus_gives_every_gpu_job_a_quarter_of_the_cores(tmp_path):
    # The old rules asked for all cores: with --resources gpu=4 four evaluations ran one after another.
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["dag"]["evaluate_in_train"] = False  # the evaluate rule too
    config = tmp_path / "separate_eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _dry_run(tmp_path, config, "--cores", "16", "--profile", "gpu", "--resources", "gpu=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [block for block in proc.stdout.split("\nrule ")[1:]]
    threads = {}
    for block in jobs:
        rule = block.split(":", 1)[0]
        line = next((ln for ln in block.splitlines() if ln.strip().startswith("threads:")), "threads: 1")
        threads.setdefault(rule, set()).add(int(line.split(":")[1]))
    for rule in ("train", "train_sae", "extract_concepts", "evaluate"):
        assert threads[rule] == {4}, (rule, threads)
    assert "OMP_NUM_THREADS=4" in proc.stdout


def _plan(tmp_path, *args):
    return subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "--cores", "1", *args],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_paper_config_plans_the_full_dag_given_by_config_or_by_configfile(tmp_path):
    paper = ROOT / "config/paper.yaml"
    by_config = _plan(tmp_path, "--config", f"config={paper}")
    assert by_config.returncode == 0, by_config.stderr[-3000:]
    # --configfile used to plan the embedded tiny experiment silently (its keys went unread)
    by_file = _plan(tmp_path, "--configfile", str(paper))
    assert by_file.returncode == 0, by_file.stderr[-3000:]
    expected = {("train", name) for name in Dag(paper).runs}  # the paper's teacher is given (GPT-2)
    expected |= {("evaluate", name) for name in Dag(paper).runs}  # evaluation jobs apart (dag.evaluate_in_train)
    assert expected <= planned_jobs(by_config.stdout) == planned_jobs(by_file.stdout)
    assert "results/paper/" in by_file.stdout and "results/tiny/" not in by_file.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--configfile", "config/paper.yaml", "config/tiny.yaml"],
     r"--configfile: give one experiment config, got 2 \(\S+paper.yaml \S+tiny.yaml\); or use --config config=PATH"),
    (["--configfile", "config/paper.yaml", "--config", "config=config/tiny.yaml"],
     r"--configfile \S+paper.yaml and --config config=config/tiny.yaml name two experiment configs; give one of them"),
], ids=["two-configfiles", "configfile-and-config"])
def test_two_experiment_configs_stop_planning_in_one_line(tmp_path, args, message):
    proc = _plan(tmp_path, *args)
    assert proc.returncode != 0
    assert re.search(r"^cocomix: error: " + message + "$", proc.stderr, re.M), proc.stderr[-2000:]


# ---- the plan and the rules' questions, without snakemake (fast) ----

def write_config(tmp_path: Path, **changes) -> Path:
    """.test/config.yaml with some top-level keys replaced (dotted: one level down)."""
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"dag": {"methods": ["ntp", "magic"]}}, r"^config key 'dag.methods\[1\]': expected one of \[.*'ntp'.*\], got 'magic'$"),
    ({"method_overrides": {"magic": {"base": {"model.n_embd": 32}}}},
     r"^config key 'method_overrides.magic': expected a method name, one of \[.*\], got 'magic'$"),
], ids=["dag.methods", "method_overrides"])
def test_plan_rejects_unknown_methods_naming_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_runs(write_config(tmp_path, **changes))


def test_the_teacher_and_the_runs_that_wait_for_its_labels_go_first(tmp_path):
    dag = Dag(write_config(tmp_path, dag={"methods": ["ntp", "kd", "cocomix"], "seeds": [0],
                                          "ablations": {"mix_only": {"concept.lam": 0.0}}}))
    assert dag.priority("teacher") == dag.teacher_priority == 2
    assert [dag.priority(r) for r in ("cocomix-base-s0", "mix_only-base-s0", "ntp-base-s0", "kd-base-s0")] == [1, 1, 0, 0]
    rules = (ROOT / "workflow/rules/concepts.smk").read_text()
    assert rules.count("priority: PLAN.teacher_priority") == 2  # train_sae and extract_concepts


def test_method_seeds_give_some_methods_other_seeds(tmp_path):
    runs = plan_runs(write_config(tmp_path, dag={"methods": ["ntp", "kd", "cocomix"], "seeds": [0, 1, 2],
                                                 "method_seeds": {"kd": [0]}}))
    assert [r.name for r in runs] == ["ntp-base-s0", "ntp-base-s1", "ntp-base-s2", "kd-base-s0",
                                      "cocomix-base-s0", "cocomix-base-s1", "cocomix-base-s2"]


@pytest.mark.parametrize("method_seeds, message", [
    ({"pause": [0]}, r"^config key 'dag.method_seeds.pause': must name a method of dag.methods \['ntp', 'kd'\]$"),
    ({"kd": []}, r"^config key 'dag.method_seeds.kd': must be a non-empty list of integer seeds$"),
])
def test_method_seeds_name_planned_methods_and_list_seeds(tmp_path, method_seeds, message):
    with pytest.raises(ConfigError, match=message):
        plan_runs(write_config(tmp_path, dag={"methods": ["ntp", "kd"], "seeds": [0], "method_seeds": method_seeds}))


def test_each_run_reads_what_its_method_needs(tmp_path):
    dag = Dag(write_config(tmp_path, dag={"methods": ["ntp", "kd", "pause", "cocomix"], "seeds": [0],
                                          "ablations": {"act_labels": {"concept.scoring": "activation"},
                                                        "online": {"concept.labels": "online"},
                                                        "hidden": {"concept.target": "hidden_l2"}}}))
    exp = dag.exp
    data, teacher, sae = f"{exp}/data/manifest.json", f"{exp}/runs/teacher/final_metrics.json", f"{exp}/sae/metrics.json"
    assert dag.train_inputs("teacher") == [data]
    assert dag.train_inputs("ntp-base-s0") == dag.train_inputs("pause-base-s0") == [data]
    assert dag.train_inputs("kd-base-s0") == [data, teacher]
    assert dag.train_inputs("cocomix-base-s0") == [data, f"{exp}/concepts/attribution-sequence_mean-k4/manifest.json"]
    assert dag.train_inputs("act_labels-base-s0") == [data, f"{exp}/concepts/activation-sequence_mean-k4/manifest.json"]
    assert dag.train_inputs("online-base-s0") == [data, teacher, sae]  # labels recomputed every step
    assert dag.train_inputs("hidden-base-s0") == [data, teacher]  # the teacher's hidden states, no SAE
    # One label cache per scoring, each made by a representative run, from the teacher and the SAE.
    assert {v: s.name for v, s in dag.label_specs.items()} == {
        "attribution-sequence_mean-k4": "cocomix-base-s0", "activation-sequence_mean-k4": "act_labels-base-s0"}
    assert dag.extract_inputs("activation-sequence_mean-k4") == [data, teacher, sae]
    assert "'concept.scoring=activation'" in dag.extract_overrides("activation-sequence_mean-k4")
    assert dag.labels_fingerprint("activation-sequence_mean-k4") != dag.labels_fingerprint("attribution-sequence_mean-k4")
    assert dag.fingerprint("kd-base-s0") != dag.fingerprint("ntp-base-s0")
    assert dag.launcher(1).endswith("python -m cocomix.cli") and dag.launcher(8).endswith("-m cocomix.launch --gpus 8")
    assert f"{exp}/tables/main.csv" in dag.report_outputs() and f"{exp}/runs/kd-base-s0/eval_summary.json" in dag.report_inputs()


def test_ablation_runs_are_tagged_with_their_name_and_keep_their_fingerprint(tmp_path):
    dag = Dag(write_config(tmp_path, dag={"methods": ["cocomix"], "seeds": [0],
                                          "ablations": {"mix_only": {"concept.lam": 0.0}}}))
    cfg = dag.config("mix_only-base-s0")
    assert cfg.tracking.tags == {"ablation": "mix_only"} and dag.config("cocomix-base-s0").tracking.tags == {}
    from cocomix.config import load_config
    from cocomix.methods import run_fingerprint
    untagged = [o for o in dag.spec("mix_only-base-s0").overrides if not o.startswith("tracking.tags.")]
    # the tag is bookkeeping: an ablation run trained before it existed still resumes
    assert run_fingerprint(cfg) == run_fingerprint(load_config(dag.config_path, untagged))


def test_cheap_rules_run_locally_and_heavy_rules_have_benchmarks():
    text = (ROOT / "Snakefile").read_text()
    local = re.search(r"^localrules:\n((?:    \w+,\n)+)", text, re.M)
    assert local and {w.strip(" ,") for w in local.group(1).splitlines()} == {"all", "report"}
    rules = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    for rule in ("prepare_data", "train_sae", "extract_concepts", "train", "evaluate", "sweep"):
        body = re.search(rf"^ *rule {rule}:\n(.*?)(?=^ *rule |\Z)", rules, re.M | re.S).group(1)
        assert "    benchmark:\n" in body, rule


def test_training_jobs_evaluate_their_own_checkpoints_unless_told_otherwise(tmp_path):
    """One process per run (dag.evaluate_in_train, default): `cocomix train --eval` writes the run's
    eval_summary.json beside final_metrics.json; false: a separate evaluate job per run; no evaluation
    at all with dag.evaluate false."""
    exp = "results/ci"
    both = Dag(write_config(tmp_path, dag={"methods": ["ntp"], "seeds": [0]}))
    assert both.train_outputs() == [f"{exp}/runs/{{run}}/final_metrics.json", f"{exp}/runs/{{run}}/eval_summary.json"]
    assert both.train_flags() == "--eval" and both.eval_in_train
    apart = Dag(write_config(tmp_path, dag={"methods": ["ntp"], "seeds": [0], "evaluate_in_train": False}))
    assert apart.train_outputs() == [f"{exp}/runs/{{run}}/final_metrics.json"] and apart.train_flags() == ""
    assert f"{exp}/runs/ntp-base-s0/eval_summary.json" in apart.report_inputs()
    none = Dag(write_config(tmp_path, dag={"methods": ["ntp"], "seeds": [0], "evaluate": False}))
    assert not none.eval_in_train and none.train_flags() == ""
    assert f"{exp}/runs/ntp-base-s0/eval_summary.json" not in none.report_inputs()


def test_the_report_reads_the_teacher_and_sae_only_where_some_run_needs_them(tmp_path):
    exp = "results/ci"
    ntp = Dag(write_config(tmp_path, dag={"methods": ["ntp"], "seeds": [0]}))
    assert not [f for f in ntp.report_inputs() if "teacher" in f or "/sae/" in f]  # no teacher trained for a table
    kd = Dag(write_config(tmp_path, dag={"methods": ["ntp", "kd"], "seeds": [0]}))
    assert f"{exp}/runs/teacher/final_metrics.json" in kd.report_inputs()
    assert f"{exp}/sae/metrics.json" not in kd.report_inputs()
    full = Dag(write_config(tmp_path, dag={"methods": ["cocomix"], "seeds": [0]}))
    assert {f"{exp}/runs/teacher/final_metrics.json", f"{exp}/sae/metrics.json"} <= set(full.report_inputs())


@pytest.mark.slow
def test_separate_evaluation_jobs_when_training_jobs_do_not_evaluate(tmp_path):
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["dag"]["evaluate_in_train"] = False
    config = tmp_path / "separate_eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(_dry_run(tmp_path, config, "--cores", "2").stdout)
    assert ("evaluate", "kd-base-s0") in jobs and ("evaluate", "teacher") not in jobs
    default = _dry_run(tmp_path, ROOT / ".test/config.yaml", "--cores", "2", "--printshellcmds")
    assert default.returncode == 0 and "evaluate" not in {rule for rule, _ in planned_jobs(default.stdout)}
    assert re.search(r"cocomix\.cli train --config \S+ --no-progress --eval '", default.stdout)


def test_given_teacher_and_sae_are_not_built(tmp_path):
    dag = Dag(write_config(tmp_path, teacher__path="some/teacher", sae__path="some/sae.pt",
                           dag={"methods": ["kd", "cocomix"], "seeds": [0]}))
    data = f"{dag.exp}/data/manifest.json"
    assert dag.teacher is None and dag.train_inputs("kd-base-s0") == [data]
    assert dag.extract_inputs("attribution-sequence_mean-k4") == [data]
    assert dag.sweep_inputs() == [data, f"{dag.exp}/concepts/attribution-sequence_mean-k4/manifest.json"]


def test_data_teacher_sae_and_labels_of_another_experiment_are_read_where_they_are(tmp_path):
    # Before: the data rule's output was always <experiment>/data/manifest.json, so an experiment with
    # `data.dir` elsewhere (sharing another's corpus) waited for a file prepare-data never writes.
    other = tmp_path / "other"
    dag = Dag(write_config(tmp_path, data__dir=str(other / "data"), teacher__path=str(other / "runs/teacher"),
                           sae__path=str(other / "sae"), concept__cache_dir=str(other / "concepts"),
                           dag={"methods": ["ntp", "cocomix"], "seeds": [0]}))
    data = str(other / "data" / "manifest.json")
    assert dag.data_manifest() == data and dag.train_inputs("ntp-base-s0") == [data]
    assert dag.train_inputs("cocomix-base-s0") == [data, str(other / "concepts" / "manifest.json")]  # the cache itself
    assert dag.label_specs == {}  # the labels are another experiment's: nothing to extract here


def test_dag_checks_every_runs_batch_against_the_training_jobs_gpus():
    Dag(ROOT / "config/paper.yaml", train_gpus=8)  # 512 / 8 = 64 per rank, micro 16: 4 accumulation steps
    with pytest.raises(ConfigError, match=r"^run teacher: train.global_batch_size=16 cannot be split evenly over 3"):
        Dag(ROOT / "config/tiny.yaml", train_gpus=3)


@pytest.mark.parametrize("cores,gpus,threads", [(16, 4, 4), (16, None, 8), (2, None, 1), (1, None, 1),
                                                 (2, 4, 1), (16, 1, 16)])
def test_gpu_job_threads_share_the_cores_among_the_gpus(cores, gpus, threads):
    assert Dag.gpu_job_threads(cores, gpus) == threads


def test_split_batch_shrinks_micro_batches_to_a_process_share():
    assert split_batch(64, 64, 8) == (8, 1)
    assert split_batch(512, 16, 8) == (16, 4)
    assert split_batch(16, 4, 2) == (4, 2)
    with pytest.raises(ConfigError, match="48 sequences each, not a multiple of train.micro_batch_size=32"):
        split_batch(96, 32, 2)


def test_slurm_time_limits_follow_each_runs_flops():
    plan = Dag(ROOT / "config/paper.yaml", train_gpus=8)
    minutes = {run: plan.runtime_minutes(f"{run}-s22") for run in ("ntp-69M", "cocomix-69M", "ntp-386M", "ntp-1.38B")}
    # 69M NTP: 0.47 GFLOP/token x 20.97B tokens at 25% of 8 x 989 TFLOP/s = 83 min, doubled, + 30 min
    assert minutes["ntp-69M"] == 197
    assert minutes["ntp-69M"] < minutes["cocomix-69M"] < minutes["ntp-386M"] < minutes["ntp-1.38B"] == 2880  # capped
    assert Dag(ROOT / ".test/config.yaml").runtime_minutes("ntp-base-s0") == 30  # seconds of work: the fixed part


def test_cocomix_plan_prints_every_paper_run_with_gpu_hours_equal_to_a_hand_count():
    # The paper plan's cost was stated nowhere: 19 runs of 21B tokens. Per run its student FLOPs, the
    # H100-hours at a stated MFU and the SLURM limit; the total on the last line.
    from cocomix.config import load_config
    from cocomix.plan import plan_runs

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "cocomix.cli", "plan", "--config", str(ROOT / "config/paper.yaml"),
                          "--mfu", "0.25"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rows = {x.split()[0]: x.split() for x in lines[1:-1]}
    assert len(rows) == 19 and set(rows) == {r.name for r in plan_runs(ROOT / "config/paper.yaml")}
    # By hand for NTP-69M: 6 N + 12 L d T FLOPs a token (N: blocks, ln_f and the LM-head matmul over the
    # padded vocabulary), at 25% of 989 TFLOP/s.
    cfg = load_config(ROOT / "config/paper.yaml", ["method=ntp", "scale=69M"])
    d, L, T = cfg.model.n_embd, cfg.model.n_layer, cfg.train.block_size
    V = -(-50257 // cfg.model.vocab_multiple) * cfg.model.vocab_multiple
    n = L * (12 * d * d + 13 * d) + 2 * d + V * d
    hours = (6 * n + 12 * L * d * T) * cfg.train.tokens / (989e12 * 0.25) / 3600
    assert float(rows["ntp-69M-s22"][3]) == pytest.approx(hours, abs=0.05)
    assert rows["ntp-1.38B-s22"][4] == "48.0"  # past the cap: resubmitted and resumed
    total = float(re.search(r"^total: 19 training runs, ([\d,.]+) GPU-hours at 25% MFU", lines[-1]).group(1).replace(",", ""))
    assert total == pytest.approx(sum(float(r[3].replace(",", "")) for r in rows.values()), abs=0.1)
    assert 2000 < total < 2400  # the estimate: about 2,200 at 25%


# ---- every command of the quick start and the reproduce page, as written ----

# The commands that cannot run here, each with why; every other command of the two pages runs below.
NOT_RUN = {
    "make run": "snakemake --cores all on config/tiny.yaml (8 minutes): test_full_dag runs the same DAG at CI size",
    "make test": "the suite itself (.ci/run)",
    "cocomix train --config config/paper.yaml scale=386M": "needs OpenWebText, GPT-2 and GPU-hours",
    "torchrun --nproc_per_node 8 -m cocomix.cli train --config config/paper.yaml": "needs 8 GPUs and the paper's inputs",
    "snakemake --profile slurm --config config=config/paper.yaml": "needs a SLURM cluster (sbatch)",
    "snakemake --cores all --profile gpu --config config=config/paper.yaml": "needs GPUs and the paper's inputs",
}
NEEDS_NETWORK = ("hf download", "curl ", "mkdir -p models/")  # section 1 of the reproduce page: downloads
# What a command leaves (relative to the sandbox) beyond a zero exit and some output.
LEAVES = {
    "cocomix train --config config/tiny.yaml model.n_embd=256 train.tokens=5e4 run_name=ntp-wide":
        "results/ci/runs/ntp-wide/final_metrics.json",
    "cocomix inspect results/tiny/runs/cocomix-base-s0 --prompt \"...\" --out inspect/": "inspect",
    "cocomix steer results/tiny/runs/cocomix-base-s0 --concepts 3 --factor 10 --out steer/": "steer",
    "cocomix export results/tiny/runs/cocomix-base-s0 hub/cocomix-tiny": "hub/cocomix-tiny/README.md",
}


@pytest.mark.slow
def test_the_quick_start_and_reproduce_commands_run_as_written(dag_run, tmp_path):
    """Each command line of docs/quickstart.md and docs/reproduce.md, verbatim, in the order printed, in a
    sandbox that is the CI DAG's folder after `make run`'s equivalent: `config/tiny.yaml` there is the CI
    config (.test/config.yaml, experiment `ci`, with `results/tiny` pointing at its results) with sweep and
    tune budgets of seconds; `config/paper.yaml`, the Snakefile and workflow/ are the checkout's. Downloads
    and cluster or GPU commands are the marked rest (NOT_RUN, NEEDS_NETWORK)."""
    from conftest import doc_commands

    box = tmp_path / "box"
    shutil.copytree(dag_run, box, symlinks=True)
    cfg = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    cfg["sweep"] = {"n_trials": 2, "workers": 1, "tokens": 4096}
    cfg["tune"] = {"n_trials": 1, "tokens": 4096}
    (box / "config").mkdir()
    (box / "config/tiny.yaml").write_text(yaml.safe_dump(cfg))
    (box / "config/paper.yaml").symlink_to(ROOT / "config/paper.yaml")
    for name in ("Snakefile", "workflow"):
        (box / name).symlink_to(ROOT / name)
    (box / "results/tiny").symlink_to("ci")

    commands = doc_commands("docs/quickstart.md") + doc_commands("docs/reproduce.md")
    assert set(NOT_RUN) <= set(commands), sorted(set(NOT_RUN) - set(commands))  # the marks name real commands
    ran = []
    for line in commands:
        if line in NOT_RUN or any(part in line for part in NEEDS_NETWORK):
            continue
        argv = shlex.split(line)
        prog = {"cocomix": [sys.executable, "-m", "cocomix.cli"], "snakemake": [sys.executable, "-m", "snakemake"]}
        assert argv[0] in prog, f"{line!r}: neither run here nor marked in NOT_RUN"
        t0 = time.perf_counter()
        proc = subprocess.run(prog[argv[0]] + argv[1:], capture_output=True, text=True, env=ENV, timeout=900, cwd=box)
        print(f"{time.perf_counter() - t0:6.1f} s  {line}")
        assert proc.returncode == 0, f"`{line}` failed (exit {proc.returncode}): {proc.stderr[-3000:]}"
        assert (proc.stdout + proc.stderr).strip(), f"`{line}` printed nothing"
        if line in LEAVES:
            assert (box / LEAVES[line]).exists(), f"`{line}` left no {LEAVES[line]}"
        ran.append(line)
    assert len(ran) >= 15 and set(LEAVES) <= set(ran)
