# The experiment DAG: corpus -> tokenizer -> shards -> teacher -> SAE -> concept labels -> training
# of every (method, scale, seed) and ablation -> evaluation of every checkpoint -> tables and plots.
#
#   snakemake --cores all                                   # config/tiny.yaml, CPU, minutes
#   snakemake --cores all --config config=config/gutenberg.yaml   (or --configfile config/gutenberg.yaml)
#   snakemake --cores all --profile gpu                     # one GPU per training job
#   snakemake --profile slurm --config config=config/paper.yaml
#
# Rules (workflow/rules/) are thin: each calls the `cocomix` CLI. Which runs exist is decided in
# cocomix/plan.py, what each job reads and its fingerprints in cocomix/dag.py.
#
# Lint (`snakemake --lint`), findings kept on purpose, one note per rule:
#   - "Specify a conda environment or container": every rule runs this package's CLI with the
#     interpreter that runs Snakemake (`make setup` or environment.yml installs both); a per-rule
#     environment would reinstall torch for each rule and could run another version of the package.
#   - "Shell command directly uses variable COCOMIX / OFFLINE / CONFIG / EXP": the interpreter, the
#     config file's path and the experiment folder stay out of `params` so that neither a moved
#     environment nor the same config given by another path reruns finished jobs (params are a
#     rerun trigger). What a job computes is in its `fingerprint` param instead.
import sys

from snakemake.utils import min_version

min_version("9.0")

from cocomix.cluster import check_jobs, train_resources
from cocomix.config import ConfigError
from cocomix.dag import Dag, config_path, declared_node, requested, rule_requests
from cocomix.gpus import local_gpu_slots

# The node a cluster profile declares (workflow/profiles/slurm: node_gpus, node_cpus, node_mem_mb) and
# what a training job asks of it: whole nodes (cocomix/cluster.py). Without one (a workstation, the gpu
# profile) a training job asks for one GPU, and as many GPU jobs run at once as there are visible GPUs
# unless `--resources gpu=N` says otherwise.
#
# The typed loader is the schema: unknown keys, wrong types, impossible values and unknown methods
# stop here, before any job starts, and so does every planned run's resolved config, and a global
# batch the GPUs of a training job cannot split: one line, `cocomix: error: ...`. (Not named DAG: a
# Snakefile runs in snakemake.workflow's globals, where DAG is Snakemake's own class.)
try:
    NODE = declared_node(workflow)
    TRAIN_RESOURCES = train_resources(NODE, requested(workflow, "train", "nodes"))
    PLAN = Dag(config_path(workflow, config), train_gpus=requested(workflow, "train", "gpu") or TRAIN_RESOURCES["gpu"])
except ConfigError as e:
    raise SystemExit(f"cocomix: error: {e}") from None
if NODE is None and requested(workflow, None, "gpu") is None and local_gpu_slots():
    workflow.global_resources["gpu"] = local_gpu_slots()
    print(f"cocomix: {local_gpu_slots()} GPUs visible, up to {local_gpu_slots()} GPU jobs at once "
          "(--resources gpu=N for fewer)", file=sys.stderr)


# `snakemake --report report.html`: one page with the tables and plots (report() in report.smk).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/concepts.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sweep.smk"


# Seconds of work: run where Snakemake runs, never submitted to a (GPU) cluster partition.
# A declared node must hold every job the profile asks for: one line at planning otherwise.
if NODE is not None:
    try:
        check_jobs(NODE, rule_requests(workflow))
    except ConfigError as e:
        raise SystemExit(f"cocomix: error: {e}") from None


localrules:
    all,
    report,


rule all:
    input:
        PLAN.report_outputs(),
