"""Compute-matched NTP arms (`dag.compute_matched`): an NTP run whose token budget spends the FLOPs
another method's run spent, counted by the compute ledger every run writes (`compute/*` in
final_metrics.json, `Trainer.compute_ledger`; conventions in cocomix/flops.py).

Two totals of a run (the compute table prints both, evals/report/compute.py):

    per step    compute/student_flops + compute/online_teacher_flops
    amortised   per step + the run's equal share of every one-off item it read: the teacher's training,
                the SAE's and label extraction, each divided over the experiment's runs that read that
                item (`shares`: runs are told apart by the item's FLOPs, so the activation ablation's
                label cache is another item than the attribution cache)

An arm's budget is set when it starts (`cocomix train --match-flops`), from its method's finished run:
tokens = total / (NTP's training FLOPs per token), rounded to whole optimizer steps, so the arm's FLOPs
are within half a step's of the total. The one-off items of a given teacher without
`teacher.training_flops`, or a given SAE (sae.path), are "not counted" and so left out of the total.
"""

from __future__ import annotations

from pathlib import Path

from cocomix.config import Config, ConfigError
from cocomix.files import read_json

ONE_OFF = ("teacher_training", "sae_training", "label_extraction")  # shared by the runs that read them


def per_step_total(final: dict) -> float | None:
    """Student + online teacher FLOPs of a finished run (None: its record has no ledger)."""
    if "compute/student_flops" not in final:
        return None
    return float(final["compute/student_flops"]) + float(final["compute/online_teacher_flops"])


def shares(finals: list[dict]) -> dict[tuple[str, float], int]:
    """How many of the runs read each one-off item, told apart by its FLOPs: {(item, FLOPs): runs}."""
    out: dict[tuple[str, float], int] = {}
    for f in finals:
        for item in ONE_OFF:
            value = f.get(f"compute/{item}_flops")
            if value is not None:
                out[(item, value)] = out.get((item, value), 0) + 1
    return out


def amortised_total(final: dict, share: dict[tuple[str, float], int]) -> float | None:
    """Per step + this run's equal share of every counted one-off item (`share` from `shares`)."""
    total = per_step_total(final)
    if total is None:
        return None
    for item in ONE_OFF:
        value = final.get(f"compute/{item}_flops")
        if value is not None:
            total += value / share[(item, value)]
    return total


def _final(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--match-flops: {path} not found (the matched run must finish first)")
    final = read_json(path)
    if per_step_total(final) is None:
        raise ConfigError(f"--match-flops: {path} has no compute ledger (compute/student_flops); retrain that run")
    return final


def matched_total(target: str | Path, amortise_over: list[str | Path] | None = None) -> float:
    """The FLOPs an arm must spend: the target run's per-step total, or (with `amortise_over`, the final
    metrics of every run of the experiment that reads a one-off item, the target among them) its
    amortised total."""
    final = _final(target)
    if amortise_over is None:
        return per_step_total(final)
    finals = [_final(p) for p in amortise_over]
    if Path(target).resolve() not in {Path(p).resolve() for p in amortise_over}:
        finals.append(final)
    return amortised_total(final, shares(finals))


def matched_tokens(cfg: Config, total_flops: float, flops_per_token: float) -> int:
    """The token budget of whole optimizer steps of `cfg` whose training FLOPs are nearest `total_flops`."""
    t = cfg.train
    per_step = t.global_batch_size * t.block_size
    steps = max(1, round(total_flops / flops_per_token / per_step))
    return steps * per_step


def student_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token of `cfg`'s student (`CocomixForCausalLM.flops_per_token`), built on the
    meta device for the prepared data's vocabulary, as the trainer builds it."""
    import torch  # lazy: the CLI loads torch after the config is valid

    from cocomix.data.shards import load_manifest  # lazy: as above
    from cocomix.methods import get_method  # lazy: as above

    manifest = load_manifest(cfg.data_dir, verify=False)
    with torch.device("meta"):
        model = get_method(cfg.method).build_model(cfg, manifest["vocab_size"], manifest["eos_id"])
    return float(model.flops_per_token(cfg.train.block_size))
