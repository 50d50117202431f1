"""Reading CoCoMix's concepts (paper §3.2, spec 4.7): what each SAE latent means, and which latents a
CoCoMix model predicts along a prompt.

    describe_concepts(cfg)      per SAE latent: its top-activating training contexts, the output tokens
                                its decoder direction promotes and, on the synthetic corpus, the
                                ground-truth concept it detects best; built once per SAE and saved as
                                descriptions.json (+ descriptions.md to read)
    load_cocomix(path)          a CoCoMix checkpoint, its tokenizer and the config it was trained with
    inspect_prompt(...)         the top-n predicted concepts at every position of a prompt
    write_inspection(...)       -> inspect.txt, inspect.json and inspect.png (positions x concepts)

CoCoMix predicts in its teacher's SAE concept space, so a concept index names the same latent for the
model, the SAE and these descriptions. Steering is in `cocomix/steering.py`.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cocomix.concepts import data_fingerprint
from cocomix.config import Config, ConfigError
from cocomix.data import DataError, TokenBlocks, load_concepts, load_tokenizer
from cocomix.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from cocomix.sae import block_activations, concept_auroc, load_sae, sae_hash, sae_path
from cocomix.teacher import load_teacher, teacher_hash
from cocomix.checkpoints import find_checkpoints
from evals.run import load_eval_config

DESCRIPTIONS = "descriptions.json"
FORMAT_VERSION = 1
MARK = ("⟦", "⟧")  # around the active token of a context


# --------------------------------------------------------------------------------------
# Concept descriptions
# --------------------------------------------------------------------------------------


def descriptions_path(cfg: Config) -> Path:
    """`descriptions.json` inside our SAE folder (so a retrained SAE takes its old descriptions with it);
    for an SAE file such as OpenAI's .pt, which may sit on read-only storage, in
    `<experiment_dir>/sae_descriptions/`."""
    p = sae_path(cfg)
    return (p if p.is_dir() else cfg.experiment_dir / "sae_descriptions") / DESCRIPTIONS


def description_key(cfg: Config) -> dict:
    """Everything the descriptions are a function of; a saved file is used only when all of it matches."""
    return {
        "format_version": FORMAT_VERSION,
        "sae_sha256": sae_hash(cfg),
        "teacher_sha256": teacher_hash(cfg),
        "data_sha256": data_fingerprint(cfg.data_dir),
        "layer": cfg.sae.layer,
        "block_size": cfg.train.block_size,
        **dataclasses.asdict(cfg.interpret),
    }


def describe_concepts(cfg: Config, device: torch.device | str | None = None) -> dict:
    """Descriptions of every SAE latent, built on first use and reused while the SAE, teacher, corpus
    and `interpret.*` settings stay the same; a file made for anything else is rebuilt.

    Returns the saved JSON: `key` (see `description_key`), `n_tokens` scanned, `promoted_by`,
    `concept_matches` (synthetic corpus: per ground-truth concept, its best-detecting latent and AUROC)
    and `latents`, one entry per latent index with
      frequency        share of scanned tokens on which it is active (post-TopK, > 0)
      max_activation   its largest activation there
      contexts         [{activation, text}], the top `interpret.contexts`, active token in ⟦ ⟧
      promoted_tokens  the `interpret.top_tokens` output tokens it raises most (see `promoted_tokens`)
      ground_truth     synthetic corpus: {id, concept, auroc} of the concept it detects best
      label, summary   a short name (its most frequent active token) and a one-line description
    """
    path = descriptions_path(cfg)
    key = description_key(cfg)
    if path.is_file():
        try:
            saved = read_json(path)
            assert isinstance(saved, dict)
        except (ValueError, AssertionError):  # damaged: rebuilt
            saved = {}
        if saved.get("key") == key:
            return saved
        print(f"{path}: made for another SAE, teacher, corpus or interpret.* settings; rebuilding", file=sys.stderr)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = _build_descriptions(cfg, key, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".md"), descriptions_markdown(result))
    atomic_write_json(path, result, indent=1, ensure_ascii=False)  # last: it marks completion
    return result


@torch.no_grad()
def _build_descriptions(cfg: Config, key: dict, device) -> dict:
    ip = cfg.interpret
    sae, teacher = load_sae(cfg, device), load_teacher(cfg, device)
    tokenizer = load_tokenizer(cfg.tokenizer.path or cfg.data_dir / "tokenizer")
    blocks = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size)
    T = blocks.block_size
    n_blocks = min(len(blocks), -(-ip.describe_tokens // T))  # the first blocks: a bounded, fixed scan
    if n_blocks == 0:
        raise DataError(f"{cfg.data_dir}: the train split has no block of {T} tokens to describe concepts with")
    max_match = ip.match_tokens if blocks.has_concepts else 0
    best_acts, best_where, fired, codes = _scan_latents(cfg, sae, teacher, blocks, n_blocks, max_match, device)
    n_tokens = n_blocks * T

    top_tokens = promoted_tokens(teacher, sae, ip.top_tokens).cpu()
    latents = [{
        "index": j,
        "frequency": int(fired[j]) / n_tokens,
        "max_activation": round(float(best_acts[j, 0]), 4),
        "contexts": [{"activation": round(float(a), 4), **_context(tokenizer, blocks, int(w), T, ip)}
                     for a, w in zip(best_acts[j], best_where[j]) if w >= 0],
        "promoted_tokens": [tokenizer.decode([int(t)]) for t in top_tokens[j]],
    } for j in range(sae.n_latents)]
    concept_matches = _match_ground_truth(cfg, blocks, codes, max_match, latents) if codes else None
    for d in latents:
        d["label"], d["summary"] = _summarize(d, n_tokens)
    return {
        "key": key,
        "n_tokens": n_tokens,
        "promoted_by": "logit lens: LM head of the final LayerNorm's centring and scale applied to the decoder "
                       "direction (the teacher blocks above sae.layer are skipped)",
        "concept_matches": concept_matches,
        "latents": latents,
    }


def _scan_latents(cfg: Config, sae, teacher, blocks, n_blocks: int, max_match: int, device):
    """Encode the first `n_blocks` train blocks; returns (best_acts (C, m), best_where (C, m), fired (C,),
    codes): per latent its top `interpret.contexts` activations and their token positions in the scan,
    how many tokens it fired on, and the (acts, inds) batches covering the first `max_match` tokens."""
    T, C, m = blocks.block_size, sae.n_latents, cfg.interpret.contexts
    best_acts = torch.zeros(C, m)                       # (C, m) top activations per latent
    best_where = torch.full((C, m), -1, dtype=torch.long)  # their token positions in the scan
    fired = torch.zeros(C, dtype=torch.long)
    codes = []  # (acts, inds) of the first `match_tokens` tokens, for the ground-truth match
    for start in range(0, n_blocks, cfg.eval.batch_size):
        idx = np.arange(start, min(n_blocks, start + cfg.eval.batch_size))
        acts, inds, _ = sae.encode(block_activations(teacher, blocks, idx, cfg.sae.layer, device))  # (n*T, k)
        acts, inds = acts.cpu(), inds.cpu()
        active = acts > 0
        fired += torch.bincount(inds[active], minlength=C)
        where = (start * T + torch.arange(len(acts)))[:, None].expand_as(inds)
        best_acts, best_where = _merge_top(best_acts, best_where, acts[active], inds[active], where[active])
        if start * T < max_match:
            codes.append((acts, inds))
    return best_acts, best_where, fired, codes


def _match_ground_truth(cfg: Config, blocks, codes: list, max_match: int, latents: list[dict]) -> list[dict]:
    """Synthetic corpus: per ground-truth concept its best-detecting latent and AUROC, over the first
    `max_match` scanned tokens; adds each latent's best-detected concept to its entry in `latents`."""
    T, C = blocks.block_size, len(latents)
    acts = torch.cat([a for a, _ in codes])[:max_match]  # (N, k)
    inds = torch.cat([i for _, i in codes])[:max_match]
    truth = blocks.get_concepts(np.arange(-(-len(acts) // T)))  # (n, T, n_slots)
    truth = truth.reshape(-1, truth.shape[-1])[: len(acts)]  # (n*T, n_slots) -> (N, n_slots)
    ids, _, auc = concept_auroc(acts, inds, C, truth)  # (M, C)
    names = {c["id"]: c["name"] for c in load_concepts(cfg.data_dir)["concepts"]}
    concept_matches = [{"id": int(c), "concept": names[int(c)], "latent": int(auc[m].argmax()),
                        "auroc": round(float(auc[m].max()), 4)} for m, c in enumerate(ids)]
    for j, m in enumerate(auc.argmax(axis=0)):
        latents[j]["ground_truth"] = {"id": int(ids[m]), "concept": names[int(ids[m])],
                                      "auroc": round(float(auc[m, j]), 4)}
    return concept_matches


def _merge_top(best_acts, best_where, acts, latents, where):
    """Keep, per latent, the m largest activations seen so far: (C, m) tables merged with a batch of
    (activation, latent, position) triples. Sorted by latent, then activation descending; the earlier
    position wins ties (stable sorts), so the result does not depend on batch boundaries."""
    C, m = best_acts.shape
    all_acts = torch.cat([best_acts.flatten(), acts])
    all_latents = torch.cat([torch.arange(C).repeat_interleave(m), latents])
    all_where = torch.cat([best_where.flatten(), where])
    order = all_acts.argsort(descending=True, stable=True)
    order = order[all_latents[order].argsort(stable=True)]
    sorted_latents = all_latents[order]
    rank = torch.arange(len(order)) - torch.searchsorted(sorted_latents, sorted_latents)  # place within its latent
    keep = rank < m
    new_acts, new_where = torch.zeros_like(best_acts), torch.full_like(best_where, -1)
    new_acts[sorted_latents[keep], rank[keep]] = all_acts[order][keep]
    new_where[sorted_latents[keep], rank[keep]] = all_where[order][keep]
    return new_acts, new_where


def _context(tokenizer, blocks, position: int, T: int, ip) -> dict:
    """{token, text}: the active token at `position` of the scan, and the tokens around it (within
    its block) with the active one between ⟦ ⟧."""
    block = blocks[position // T].astype(np.int64)
    t = position % T
    left = tokenizer.decode(block[max(0, t - ip.context_before) : t])
    token = tokenizer.decode(block[t : t + 1])
    right = tokenizer.decode(block[t + 1 : t + 1 + ip.context_after])
    return {"token": token, "text": f"{left}{MARK[0]}{token}{MARK[1]}{right}".replace("\n", "⏎")}


@torch.no_grad()
def promoted_tokens(teacher, sae, n: int, chunk: int = 1024) -> torch.Tensor:
    """(C, n) output tokens each latent's decoder direction promotes most, by the logit lens: the
    direction (W_dec column j; the SAE's σ_t only rescales it) is centred and scaled as the final
    LayerNorm does and read by the LM head. The teacher blocks above `sae.layer` are skipped, so this
    approximates the latent's effect on the output (exact only if the SAE reads the last block);
    the LayerNorm's bias and variance change are the same for every latent and are left out."""
    ln_f = teacher.transformer.ln_f
    unembed = teacher.lm_head.weight[: teacher.config.real_vocab_size]  # (V, d): padding rows are no token
    out = []
    for a in range(0, sae.n_latents, chunk):  # (V, chunk) at a time: V x C would not fit at paper scale
        directions = sae.W_dec[:, a : a + chunk]  # (d, chunk)
        directions = (directions - directions.mean(dim=0)) * ln_f.weight[:, None]
        out.append((unembed @ directions).topk(n, dim=0).indices.t())  # (chunk, n)
    return torch.cat(out)


def _show(token: str) -> str:
    return token.strip() or repr(token)


def _summarize(d: dict, n_tokens: int) -> tuple[str, str]:
    """(label, summary) of one latent: its most frequent active token, and one readable line."""
    promotes = ", ".join(_show(t) for t in d["promoted_tokens"][:4])
    truth = d.get("ground_truth")
    truth = f"; ≈ {truth['concept']} (AUROC {truth['auroc']:.2f})" if truth else ""
    if not d["contexts"]:
        return "(inactive)", f"never active in {n_tokens:,} tokens; promotes {promotes}{truth}"
    ranked = [t for t, _ in Counter(_show(c["token"]) for c in d["contexts"]).most_common()]
    return ranked[0], f"fires on {', '.join(ranked[:4])}; promotes {promotes}{truth}"


def descriptions_markdown(desc: dict) -> str:
    """The descriptions as a document to read: one section per latent."""
    key = desc["key"]
    lines = [
        "# SAE concept descriptions", "",
        f"SAE sha256 {key['sae_sha256'][:12]}, layer {key['layer']}, teacher sha256 {key['teacher_sha256'][:12]}; "
        f"{desc['n_tokens']:,} training tokens scanned. Promoted tokens: {desc['promoted_by']}.", "",
    ]
    if desc["concept_matches"]:
        lines += ["## Ground-truth concepts and their best latents", "", "| concept | latent | AUROC |", "|---|---|---|"]
        lines += [f"| {m['concept']} | {m['latent']} | {m['auroc']:.3f} |" for m in desc["concept_matches"]]
        lines.append("")
    for d in desc["latents"]:
        lines += [f"## Concept {d['index']}: {d['label']}", "",
                  f"active on {100 * d['frequency']:.3f}% of tokens; {d['summary']}", ""]
        lines += [f"- {c['activation']:.2f}  `{c['text']}`" for c in d["contexts"]]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# A CoCoMix checkpoint and its predictions
# --------------------------------------------------------------------------------------


def load_cocomix(checkpoint: str | Path, config_path: str | None = None, overrides=(), device="cpu"):
    """(model, tokenizer, cfg, checkpoint folder) for a CoCoMix checkpoint folder or a run folder (its
    latest checkpoint). The config is the run's resolved `config.yaml` (teacher, SAE and data as
    trained), or `config_path` for a checkpoint outside a run folder; then `overrides`."""
    from transformers import AutoModelForCausalLM

    run_dir, checkpoints = find_checkpoints(checkpoint)
    ckpt = checkpoints[-1]
    meta = read_json(ckpt / "config.json")
    if meta.get("slot") != "concept" or meta.get("concept_target", "concepts") != "concepts":
        raise DataError(f"{ckpt}: not a CoCoMix checkpoint (method {meta.get('method')!r}, slot {meta.get('slot')!r}); "
                        "expected a model trained with --method cocomix that predicts SAE concepts")
    cfg = load_eval_config(run_dir, config_path, list(overrides))
    n_concepts = (meta.get("slot_options") or {}).get("n_concepts", meta.get("n_concepts"))  # new / older layout
    if n_concepts != cfg.sae.n_latents:
        raise ConfigError(f"config key 'sae.n_latents': {cfg.sae.n_latents}, but {ckpt} predicts "
                          f"{n_concepts} concepts (expected the SAE it was trained with)")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    return model, load_tokenizer(ckpt), cfg, ckpt


def encode_prompt(tokenizer, prompt: str, device="cpu") -> torch.Tensor:
    """(1, T) ids of the prompt after one EOS token: in the training stream every document follows an
    EOS, so the prompt reads as the start of a document (GPT-2's convention too). "" is just the EOS."""
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], device=device)


@torch.no_grad()
def inspect_prompt(model, tokenizer, input_ids: torch.Tensor, top_n: int = 5) -> dict:
    """The concept head's top-n concepts at every position of `input_ids` (1, T): index, logit z_t[j]
    and probability softmax(z_t)[j] (the distribution the concept loss trains). The ranking is the
    one TopK compression uses, so with top_n <= concept.k these concepts all enter the model."""
    if input_ids.shape[1] > model.config.n_positions:
        raise DataError(f"prompt of {input_ids.shape[1]} tokens exceeds the model's n_positions={model.config.n_positions}")
    logits = model.predict_concepts(input_ids).logits[0].float()  # (T, C)
    probs = logits.softmax(dim=-1)
    top = probs.topk(min(top_n, logits.shape[-1]), dim=-1)
    positions = []
    for t, token in enumerate(input_ids[0].tolist()):
        positions.append({
            "position": t,
            "token": tokenizer.decode([token]),
            "concepts": [{"index": int(j), "probability": round(float(p), 5), "logit": round(float(logits[t, j]), 4)}
                         for p, j in zip(top.values[t], top.indices[t])],
        })
    # The heat map's columns: every concept in some position's top-n, strongest first.
    union = sorted({c["index"] for p in positions for c in p["concepts"]}, key=lambda j: -float(probs[:, j].max()))
    return {"positions": positions, "heatmap_concepts": union,
            "heatmap": [[round(float(v), 5) for v in row] for row in probs[:, union].tolist()]}


def write_inspection(result: dict, descriptions: dict, out_dir: Path, header: list[str]) -> list[Path]:
    """inspect.txt (per position: token, then its top concepts with probability, logit and description),
    inspect.json (the same data) and inspect.png (heat map of positions x concepts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latents = descriptions["latents"]
    lines = [*header, ""]
    for p in result["positions"]:
        lines.append(f"position {p['position']:>3}  {p['token']!r}")
        for c in p["concepts"]:
            lines.append(f"    concept {c['index']:>5}  p={c['probability']:.3f}  z={c['logit']:+.2f}  "
                         f"{latents[c['index']]['summary']}")
    files = [out_dir / "inspect.txt", out_dir / "inspect.json", out_dir / "inspect.png"]
    atomic_write_text(files[0], "\n".join(lines) + "\n")
    atomic_write_json(files[1], result, indent=1, ensure_ascii=False)
    _heatmap(result, latents, files[2])
    return files


def _heatmap(result: dict, latents: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array(result["heatmap"])  # (T, U)
    columns = result["heatmap_concepts"]
    rows = [f"{p['position']} {_show(p['token'])}" for p in result["positions"]]
    fig, ax = plt.subplots(figsize=(2 + 0.35 * len(columns), 1.5 + 0.3 * len(rows)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(columns)), [f"{j} {latents[j]['label']}" for j in columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("concept (SAE latent) and its most frequent active token")
    ax.set_ylabel("position and token")
    ax.set_title("CoCoMix predicted concept probabilities", fontsize=9)
    fig.colorbar(image, ax=ax, label="softmax(z_t)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
