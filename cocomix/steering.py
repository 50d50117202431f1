"""Steering generation through concepts (paper §3.2, Fig. 5 and 10; spec 4.7), and a check that it works.

CoCoMix: the predicted logit z_t[j] of each chosen concept j is multiplied by a factor before TopK
and compression, at every position (`CocomixForCausalLM.steer_concepts`; the paper uses -10 .. 10).

Teacher, the paper's GPT-2 comparison: the same index of its SAE, at the SAE's layer. The latent's
pre-activation is multiplied by the factor before TopK (as CoCoMix's logit is), the code decoded, and
the change of the reconstruction added to the residual stream, so the SAE's reconstruction error is
kept and a factor of 1 changes nothing. (The paper only says it increases the SAE activation; the
mechanism is our choice, spec 4.7.)

Every generation runs unsteered and steered with the same seed, so the two differ by the intervention
alone. A factor multiplies a logit or pre-activation, so its sign matters: a concept the model rates
negatively at a position is pushed further out by a positive factor and pulled in by a negative one.

    steer(...)            both models, unsteered vs steered -> steer.txt, steer.json, steer.png
    steering_check(...)   synthetic corpus: the frequency of a ground-truth concept's words in
                          generations with its best-matching latent amplified, against unsteered
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cocomix.data import DataError, load_concepts
from cocomix.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from cocomix.interpret import _show, encode_prompt
from cocomix.hf_teacher import layer_output, with_layer_output
from cocomix.teacher import run_teacher


def check_concepts(factors: dict[int, float], n_concepts: int) -> None:
    bad = [j for j in factors if not 0 <= j < n_concepts]
    if bad:
        raise DataError(f"concept indices {bad} are outside [0, {n_concepts}) (the SAE's latents)")


def check_length(models, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    limit = min(m.config.n_positions for m in models)
    if input_ids.shape[1] + max_new_tokens > limit:
        raise DataError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                        f"the models' {limit} positions")


@contextmanager
def steer_teacher(teacher, sae, layer: int, factors: dict[int, float]):
    """Within the block, every teacher forward edits the residual stream after block `layer`:
    h <- h + SAE_decode(TopK(c_pre * s)) - SAE_decode(TopK(c_pre)), with s = the factor at the chosen
    latents and 1 elsewhere (module docstring)."""
    check_concepts(factors, sae.n_latents)
    scale = torch.ones(sae.n_latents, device=sae.W_dec.device)
    scale[list(factors)] = torch.tensor(list(factors.values()), device=scale.device, dtype=scale.dtype)

    def reconstruction(pre, info):
        top = pre.topk(sae.k, dim=-1)
        return sae.decode(F.relu(top.values), top.indices, info)

    def hook(module, args, output):  # its hidden states h: (B, T, d)
        h = layer_output(output)
        x, info = sae.preprocess(h)
        pre = sae.encode_pre_act(x)  # (B, T, C), dense: generation batches are small
        return with_layer_output(output, h + (reconstruction(pre * scale, info) - reconstruction(pre, info)))

    handle = teacher.transformer.h[layer].register_forward_hook(hook)
    try:
        yield teacher
    finally:
        handle.remove()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, n_samples: int, max_new_tokens: int, seed: int,
             temperature: float) -> torch.Tensor:
    """(n_samples, <= max_new_tokens) continuations of `input_ids` (1, T): greedy when temperature
    is 0, else sampled from softmax(logits / temperature) over the whole vocabulary, torch's RNG
    seeded with `seed` (and restored afterwards). A row that ends with EOS is padded with EOS."""
    ids = input_ids.expand(n_samples, -1)
    eos = model.config.eos_token_id
    sampling = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=eos, eos_token_id=eos, **sampling)
    return out[:, ids.shape[1]:]


def continuation_texts(tokenizer, new_ids: torch.Tensor) -> list[str]:
    """Each row decoded up to its first EOS."""
    texts = []
    for row in new_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row))
    return texts


@torch.no_grad()
def latent_activation(teacher, sae, layer: int, input_ids: torch.Tensor, latents: list[int]) -> torch.Tensor:
    """(B, T) summed SAE activation of `latents` on the (unedited) teacher's residual stream: how
    present the steered concepts are in a text, measured the same way for both models' outputs."""
    _, h = run_teacher(teacher, input_ids, layer, stop_at_layer=True)
    acts, inds, _ = sae.encode(h)  # (B, T, k)
    chosen = torch.isin(inds, torch.tensor(latents, device=inds.device))
    return (acts * chosen).sum(dim=-1)


def steer(model, tokenizer, teacher, sae, layer: int, prompt: str, factors: dict[int, float], n_samples: int = 1,
          max_new_tokens: int = 32, seed: int = 0, temperature: float = 0.0) -> dict:
    """Unsteered and steered generations of CoCoMix (`model`) and of the teacher through its SAE, with
    the same seed for all four. Returns {prompt, factors, seed, temperature, cocomix: {...}, teacher:
    {...}}; per model `unsteered` and `steered` texts and `activation`, the mean (over samples) summed
    activation of the chosen latents at each generated position (see `latent_activation`), NaN past EOS."""
    check_concepts(factors, model.slot.n_concepts)
    input_ids = encode_prompt(tokenizer, prompt, model.device)
    check_length((model, teacher), input_ids, max_new_tokens)
    result = {"prompt": prompt, "factors": {str(j): f for j, f in factors.items()}, "seed": seed,
              "temperature": temperature, "n_samples": n_samples}
    contexts = {"cocomix": (model, lambda: model.steer_concepts(factors)),
                "teacher": (teacher, lambda: steer_teacher(teacher, sae, layer, factors))}
    for name, (lm, steering) in contexts.items():
        runs = {"unsteered": generate(lm, input_ids, n_samples, max_new_tokens, seed, temperature)}
        with steering():
            runs["steered"] = generate(lm, input_ids, n_samples, max_new_tokens, seed, temperature)
        result[name] = {}
        for run, new_ids in runs.items():
            full = torch.cat([input_ids.expand(len(new_ids), -1), new_ids], dim=1)
            activation = latent_activation(teacher, sae, layer, full, list(factors))[:, input_ids.shape[1]:]
            ended = (new_ids == tokenizer.eos_token_id).long().cumsum(dim=1) > 0  # at or after EOS
            activation = activation.masked_fill(ended, float("nan")).nanmean(dim=0)
            result[name][run] = continuation_texts(tokenizer, new_ids)
            result[name][f"{run}_activation"] = [None if np.isnan(v) else round(v, 4) for v in activation.tolist()]
    return result


def write_steering(result: dict, descriptions: dict, out_dir: Path, header: list[str]) -> list[Path]:
    """steer.txt (each sample unsteered above steered, CoCoMix then teacher), steer.json and steer.png
    (the chosen latents' activation along the generated positions, unsteered vs steered, per model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latents = descriptions["latents"]
    lines = [*header]
    for j, f in result["factors"].items():
        lines.append(f"concept {j} x {f:g}: {latents[int(j)]['summary']}")
    lines += [f"prompt: {result['prompt']!r}  seed {result['seed']}  temperature {result['temperature']:g}", ""]
    titles = {"cocomix": "CoCoMix (predicted concept logit x factor)",
              "teacher": "teacher + SAE (latent pre-activation x factor at the SAE layer)"}
    for name, title in titles.items():
        lines.append(f"== {title}")
        for i, (plain, steered) in enumerate(zip(result[name]["unsteered"], result[name]["steered"])):
            lines += [f"  sample {i}", f"    unsteered: {plain}", f"    steered:   {steered}"]
        lines.append("")
    files = [out_dir / "steer.txt", out_dir / "steer.json", out_dir / "steer.png"]
    atomic_write_text(files[0], "\n".join(lines))
    atomic_write_json(files[1], result, indent=1, ensure_ascii=False)
    _activation_plot(result, latents, titles, files[2])
    return files


def _activation_plot(result: dict, latents: list[dict], titles: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, (name, title) in zip(axes, titles.items()):
        for run, style in (("unsteered", "-"), ("steered", "--")):
            values = [np.nan if v is None else v for v in result[name][f"{run}_activation"]]
            ax.plot(range(len(values)), values, style, marker=".", label=run)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generated position")
        ax.legend(fontsize=8)
    names = ", ".join(f"{j} {_show(latents[int(j)]['label'])} x{f:g}" for j, f in result["factors"].items())
    axes[0].set_ylabel("steered latents' activation\n(teacher SAE, mean of samples)")
    fig.suptitle(f"steered concepts: {names}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


# --------------------------------------------------------------------------------------
# The quantitative check on the synthetic corpus
# --------------------------------------------------------------------------------------


def word_frequency(texts: list[str], words: set[str]) -> float:
    """Share of the whitespace-separated words of `texts` that are in `words` (the synthetic corpus
    joins words with single spaces, so this counts whole words)."""
    all_words = [w for t in texts for w in t.split()]
    return sum(w in words for w in all_words) / max(1, len(all_words))


def steering_check(cfg, model, tokenizer, teacher, sae, descriptions: dict, concept: str | None = None,
                   factor: float = 10.0, n_samples: int = 64, max_new_tokens: int = 32, seed: int = 0,
                   temperature: float = 1.0, prompt: str = "") -> dict:
    """Does amplifying a latent raise the frequency of its ground-truth concept's words?

    The latent is the one that best detects `concept` (a name from the corpus's concepts.json, e.g.
    "topic_3"; default: the concept detected best of all) by AUROC of its SAE activation, as in
    `concept_recovery` (`descriptions["concept_matches"]`). Each model generates `n_samples` sampled
    continuations of `prompt` (default: a document start) with the same seed at factor 1 and at `factor`
    besides unsteered. Returns the matched concept and latent, and per model the word frequency of
    each run and whether factor 1 reproduced the unsteered tokens exactly.
    """
    matches = descriptions.get("concept_matches")
    if not matches:
        raise DataError(f"{cfg.data_dir}: no ground-truth concepts (the steering check needs the synthetic corpus)")
    by_name = {m["concept"]: m for m in matches}
    if concept is None:
        match = max(matches, key=lambda m: m["auroc"])
    elif concept in by_name:
        match = by_name[concept]
    else:
        raise DataError(f"ground-truth concept {concept!r}: not in the corpus (expected one of {sorted(by_name)})")
    table = {c["id"]: c for c in load_concepts(cfg.data_dir)["concepts"]}
    words = set(table[match["id"]]["words"])
    latent = match["latent"]
    input_ids = encode_prompt(tokenizer, prompt, model.device)
    check_length((model, teacher), input_ids, max_new_tokens)
    result = {"concept": match["concept"], "latent": latent, "auroc": match["auroc"], "factor": factor,
              "n_samples": n_samples, "max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature,
              "prompt": prompt}
    contexts = {"cocomix": (model, lambda f: model.steer_concepts({latent: f})),
                "teacher": (teacher, lambda f: steer_teacher(teacher, sae, cfg.sae.layer, {latent: f}))}
    for name, (lm, steering) in contexts.items():
        unsteered = generate(lm, input_ids, n_samples, max_new_tokens, seed, temperature)
        runs = {}
        for f in (1.0, factor):
            with steering(f):
                runs[f] = generate(lm, input_ids, n_samples, max_new_tokens, seed, temperature)
        result[name] = {
            "unsteered": word_frequency(continuation_texts(tokenizer, unsteered), words),
            "factor_one": word_frequency(continuation_texts(tokenizer, runs[1.0]), words),
            "steered": word_frequency(continuation_texts(tokenizer, runs[factor]), words),
            "factor_one_identical": torch.equal(runs[1.0], unsteered),
        }
    return result


def write_check(result: dict, out_dir: Path) -> list[Path]:
    """steer_check.txt (one line per model: word frequency unsteered -> steered) and steer_check.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{result['concept']}: latent {result['latent']} (AUROC {result['auroc']:.3f}) x {result['factor']:g}, "
             f"{result['n_samples']} samples of {result['max_new_tokens']} tokens, seed {result['seed']}"]
    for name in ("cocomix", "teacher"):
        r = result[name]
        lines.append(f"{name}: {result['concept']} words {100 * r['unsteered']:.2f}% unsteered -> "
                     f"{100 * r['steered']:.2f}% steered (factor 1: {100 * r['factor_one']:.2f}%, "
                     f"identical tokens: {r['factor_one_identical']})")
    files = [out_dir / "steer_check.txt", out_dir / "steer_check.json"]
    atomic_write_text(files[0], "\n".join(lines) + "\n")
    atomic_write_json(files[1], result, indent=1)
    return files
