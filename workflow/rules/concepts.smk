# Teacher -> SAE -> concept labels. Labels are computed once per way of scoring them and shared by
# every CoCoMix run and seed (cocomix/concepts.py).


def teacher_inputs():
    """The teacher run's output when the DAG trains the teacher (teacher.path unset)."""
    return [f"{EXP}/runs/teacher/final_metrics.json"] if TEACHER else []


def sae_inputs():
    """The trained SAE when the DAG trains it (sae.path unset, e.g. not OpenAI's GPT-2 SAE)."""
    return [] if BASE.sae.path else [f"{EXP}/sae/metrics.json"]


def label_variant(spec):
    """The label cache a run reads (None for methods without cached labels)."""
    cfg = spec.config(CONFIG)
    if cfg.method != "cocomix" or cfg.concept.labels != "cached" or cfg.concept.target != "concepts":
        return None
    return str(cfg.concept_dir.relative_to(BASE.experiment_dir / "concepts"))


# One representative run per label cache: its overrides tell extract-concepts how to score.
LABEL_SPECS = {}
for _spec in RUNS.values():
    _variant = label_variant(_spec)
    if _variant is not None:
        LABEL_SPECS.setdefault(_variant, _spec)


rule train_sae:
    """TopK SAE on the teacher's residual stream after block sae.layer."""
    input:
        f"{EXP}/data/manifest.json",
        teacher_inputs(),
    output:
        f"{EXP}/sae/metrics.json",
    params:
        fingerprint=lambda wc: section_fingerprint(BASE, ("data", "tokenizer", "teacher", "sae", "train.block_size")),
    log:
        f"{EXP}/logs/train_sae.log",
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {COCOMIX} train-sae --config {CONFIG} --no-progress > {log} 2>&1"


rule extract_concepts:
    """Attribution labels for every train and val block, once (resumable after a kill)."""
    input:
        f"{EXP}/data/manifest.json",
        teacher_inputs(),
        sae_inputs(),
    output:
        f"{EXP}/concepts/{{variant}}/manifest.json",
    params:
        overrides=lambda wc: " ".join(f"'{o}'" for o in LABEL_SPECS[wc.variant].overrides),
        fingerprint=lambda wc: section_fingerprint(LABEL_SPECS[wc.variant].config(CONFIG),
                                                   ("data", "tokenizer", "teacher", "sae", "concept", "train.block_size")),
    log:
        f"{EXP}/logs/extract_concepts/{{variant}}.log",
    wildcard_constraints:
        variant="[^/]+",
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {COCOMIX} extract-concepts --config {CONFIG} --no-progress {params.overrides} "
        "> {log} 2>&1"
