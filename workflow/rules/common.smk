# The names the rules' shell commands use. They stay out of `params` (see the lint notes in the
# Snakefile): a moved environment or another path to the same config must not rerun finished jobs.
CONFIG = PLAN.config_path
EXP = PLAN.exp
OFFLINE = PLAN.offline
COCOMIX = PLAN.cli
