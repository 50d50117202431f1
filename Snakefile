# The experiment DAG: corpus -> tokenizer -> shards -> teacher -> SAE -> concept labels -> training
# of every (method, scale, seed) and ablation -> evaluation of every checkpoint -> tables and plots.
#
#   snakemake --cores all                                   # config/tiny.yaml, CPU, minutes
#   snakemake --cores all --config config=config/gutenberg.yaml
#   snakemake --cores all --profile gpu                     # one GPU per training job
#   snakemake --profile slurm --config config=config/paper.yaml
#
# Rules are thin: each calls the `cocomix` CLI. Which runs exist is decided in cocomix/dag.py.
import os
import sys

from cocomix.config import load_config
from cocomix.dag import fingerprint, plan_runs, teacher_spec
from cocomix.methods import get_method
from cocomix.sweep import study_name

# Every job runs offline (a wrong local path must fail at once, not retry the hub).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

CONFIG = config.get("config", "config/tiny.yaml")
# The typed loader is the schema: unknown keys, wrong types and impossible values stop here,
# before any job starts, and so does every planned run's resolved config.
BASE = load_config(CONFIG)
RUNS = {r.name: r for r in plan_runs(CONFIG)}
TEACHER = teacher_spec(CONFIG)
EXP = str(BASE.experiment_dir)
OFFLINE = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
COCOMIX = f"{OFFLINE} {sys.executable} -m cocomix.cli"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/concepts.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sweep.smk"


rule all:
    input:
        report_outputs(),
