def run_dir(name):
    return f"{EXP}/runs/{name}"


def run_overrides(name):
    """CLI overrides of a planned run (or the teacher), quoted for the shell."""
    spec = TEACHER if name == "teacher" else RUNS[name]
    return " ".join(f"'{o}'" for o in spec.overrides)


def run_fingerprint(wildcards):
    """Changes when (and only when) a config section this run's method reads changes."""
    spec = TEACHER if wildcards.run == "teacher" else RUNS[wildcards.run]
    return fingerprint(spec.config(CONFIG))


def section_fingerprint(cfg, keys):
    """sha256 of some config sections (dotted keys allowed), for params-triggered reruns."""
    import hashlib
    import json

    tree = cfg.to_dict()
    picked = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
