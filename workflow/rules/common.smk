# The names the rules' shell commands use. They stay out of `params` (see the lint notes in the
# Snakefile): a moved environment or another path to the same config must not rerun finished jobs.
from snakemake.exceptions import WorkflowError

from cocomix.cluster import agent_cpus, extract_resources

CONFIG = PLAN.config_path
EXP = PLAN.exp
OFFLINE = PLAN.offline
COCOMIX = PLAN.cli
TRAIN_FLAGS = PLAN.train_flags()  # `--eval`: each training job evaluates its own checkpoints
# CPU threads of each GPU job (training, SAE, labels, evaluation): the cores shared among the GPUs
# of `--resources gpu=N`, so N of them run side by side.
def _cores():
    try:
        return workflow.cores
    except WorkflowError:  # `snakemake --report` / `--lint` without --cores: no job runs
        return 1


GPU_THREADS = PLAN.gpu_job_threads(_cores(), requested(workflow, None, "gpu"))
# Label extraction runs over every GPU of its node (cocomix/cluster.py: extract_resources).
EXTRACT_RESOURCES = extract_resources(NODE, local_gpu_slots(), requested(workflow, None, "gpu"))
