"""CoCoMix (spec 1.3-1.6) as a method on the shared backbone and trainer.

The model side (concept head, TopK, sparse compression, interleaving) is the `concept` slot module of
`cocomix/slots.py` (`hidden` for the hidden-state ablation); this file fills its options from the
`concept` config section, fetches the concept labels and computes the objective

    L = CE_next_token + lam * mean_{i in I_t} CE(z_t, i)           (spec 1.6, Eq. 2)

Labels I_t (K_attr per position) come from the extracted cache (`concept.labels: cached`) or are
recomputed with teacher + SAE every step (`online`, as the official code). A position without a next
token carries label -1 and is masked; the official code includes it with arbitrary labels (spec 1.2 iv).

Ablation switches (spec 3), all in `cfg.concept`: `scoring` (labels), `mix` (interleave / add / none),
`lam: 0` (mixing only, no labels needed), `target: hidden_l2 | hidden_cosine` (regress the teacher's
normalised hidden state at `sae.layer` instead of predicting concepts), and `k`, `k_attr`, `insert_layer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cocomix.concepts import LabelCache, concept_labels, label_precision
from cocomix.config import Config, ConfigError, SweepParam
from cocomix.files import read_json
from cocomix.flops import block_params, concept_label_flops_per_token, sae_training_flops_per_token
from cocomix.methods.base import Batch, Method, register
from cocomix.sae import load_sae
from cocomix.slots import normalize_per_token
from cocomix.teacher import load_teacher, run_teacher, teacher_dir, teacher_shape, teacher_training_flops


def concept_loss(logits: torch.Tensor, labels: torch.Tensor, per_block: bool = False) -> torch.Tensor:
    """Mean over labelled positions of the mean over K_attr of CE(z_t, label) (spec 1.3, Eq. 2).

    logits (B, T, C); labels (B, T, K) with -1 where a position has no label. Each label is its own
    softmax cross-entropy over all C logits (not a multi-label loss), as the official code.
    per_block: one mean per block, shape (B,), instead of one over the batch.
    """
    valid = labels >= 0  # (B, T, K)
    logits = logits.float()  # a stable log-softmax under bf16 autocast
    # -log softmax(z)[i] = logsumexp(z) - z[i]; one logsumexp per position serves all K labels.
    nll = (logits.logsumexp(-1, keepdim=True) - logits.gather(-1, labels.clamp(min=0))) * valid  # (B, T, K)
    if per_block:
        return nll.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    return nll.sum() / valid.sum().clamp(min=1)


def hidden_regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The direct hidden-state ablation (spec 3): prediction vs the teacher's per-token normalised
    hidden state, both (B, T, D). l2: mean squared error (||.||^2 / D, so its scale is comparable to a
    CE); cosine: 1 - cos."""
    prediction = prediction.float()
    if kind == "hidden_l2":
        return (prediction - target).pow(2).mean()
    return 1.0 - F.cosine_similarity(prediction, target, dim=-1).mean()


@register
class CoCoMix(Method):
    name = "cocomix"
    description = ("CoCoMix (Continuous Concept Mixing, Tack et al., 2025): after `insert_layer` blocks a concept "
                   "head predicts the sparse-autoencoder concepts a frozen teacher's residual stream attributes the "
                   "next token to (cross-entropy on the top `k_attr` labels), compresses its TopK prediction into "
                   "one continuous vector, and interleaves that vector with the token's hidden state for the upper "
                   "blocks")
    reads = ("teacher", "sae", "concept")  # the labels depend on all three
    slot = "concept"

    def __init__(self):
        self.cfg: Config | None = None
        self.label_cache = None
        self.teacher = None
        self.sae = None

    # ---- declarations ----

    def artifacts(self, cfg: Config) -> frozenset[str]:
        c = cfg.concept
        if c.target != "concepts":
            return frozenset({"teacher"})  # the hidden-state target is the teacher's, computed online
        return frozenset({"labels"}) if c.labels == "cached" else frozenset({"teacher", "sae"})

    def tune_space(self, cfg: Config) -> dict[str, SweepParam]:
        """The learning rate and warm-up, lambda (0.01 to 1, log), the TopK k of the compressed prediction
        (the sweep's range, concept.k/4 to 4 concept.k, log) and the insertion layer (1 to n_layer - 1).
        concept.k_attr is left out: another k_attr is another label cache, extracted again."""
        k = cfg.concept.k
        return {**super().tune_space(cfg), "concept.lam": SweepParam("float", 0.01, 1.0, log=True),
                "concept.k": SweepParam("int", max(1, k // 4), max(max(1, k // 4), min(cfg.sae.n_latents, 4 * k)), log=True),
                "concept.insert_layer": SweepParam("int", 1, max(1, cfg.model.n_layer - 1))}

    def slot_for(self, cfg: Config) -> str:
        # the concept head, or the hidden-state regressor of the direct-hidden-state ablation
        return "concept" if cfg.concept.target == "concepts" else "hidden"

    def slot_options(self, cfg: Config) -> dict:
        c = cfg.concept
        if c.target != "concepts":
            return {"hidden_dim": _teacher_width(cfg), "mix": c.mix, "readout": c.readout}
        options = {"n_concepts": cfg.sae.n_latents, "k": c.k, "mix": c.mix, "readout": c.readout}
        if c.init_scale != 1.0:  # the official init writes no key (its config.json is unchanged)
            options["init_scale"] = c.init_scale
        return options

    # ---- labels ----

    @property
    def _needs_labels(self) -> bool:
        return self.cfg.concept.lam > 0 and self.cfg.concept.target == "concepts"

    def setup(self, trainer) -> None:
        self.cfg = cfg = trainer.cfg
        if self._needs_labels and cfg.concept.labels == "cached":
            self.label_cache = LabelCache(cfg)  # refuses a cache made for other data/teacher/SAE/k_attr
        elif self._needs_labels or cfg.concept.target != "concepts":
            self.teacher = load_teacher(cfg, trainer.device)
            if cfg.concept.target == "concepts":
                self.sae = load_sae(cfg, trainer.device)

    def extras(self, split: str, block_indices) -> dict[str, torch.Tensor]:
        if self.label_cache is None:
            return {}
        return {"concept_labels": self.label_cache.get(split, block_indices)}  # (B, T, K_attr)

    def _labels(self, batch: Batch) -> torch.Tensor:
        if "concept_labels" in batch.extras:
            return batch.extras["concept_labels"]
        with torch.enable_grad(), label_precision(batch.input_ids.device, "fp32"):  # as cached labels by default
            return concept_labels(self.teacher, self.sae, batch.input_ids, self.cfg.concept, self.cfg.sae.layer)

    def _teacher_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
            h = run_teacher(self.teacher, input_ids, self.cfg.sae.layer, stop_at_layer=True)[1]
        return normalize_per_token(h)[0]  # (B, T, D): the scale-free target the head regresses

    # ---- objective ----

    def loss(self, model, batch: Batch):
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        parts = {"ntp_loss": out.loss.detach()}
        if out.concept_norm_ratio is not None:  # the concept slot's norm next to its token's (train/...)
            parts["slot_norm_ratio"] = out.concept_norm_ratio
        c = self.cfg.concept if self.cfg is not None else None
        if c is None or c.lam == 0:
            return out.loss, parts  # "mixing only": the head is trained through the LM loss alone
        if c.target == "concepts":
            aux = concept_loss(out.concept_logits, self._labels(batch))
        else:
            aux = hidden_regression_loss(out.concept_logits, self._teacher_hidden(batch.input_ids), c.target)
        parts["concept_loss"] = aux.detach()
        return out.loss + c.lam * aux, parts

    def eval_metrics(self, model, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per held-out block: the concept loss, top-1 accuracy of z_t against the first (highest-scored)
        label, and whether the top-1 concept is any of the K_attr labels."""
        if self.cfg is None or not self._needs_labels:
            return {}
        labels = self._labels(batch)  # (B, T, K)
        concept_logits = model.predict_concepts(batch.input_ids).logits  # only the first insert_layer blocks
        valid = labels[..., 0] >= 0  # (B, T)
        top1 = concept_logits.argmax(-1)  # (B, T)
        per_position = {
            "concept_acc": (top1 == labels[..., 0]).float(),
            "concept_acc_any": (top1[..., None] == labels).any(-1).float(),
        }
        out = {k: (v * valid).sum(1) / valid.sum(1).clamp(min=1) for k, v in per_position.items()}
        out["concept_loss"] = concept_loss(concept_logits, labels, per_block=True)
        return out

    def teacher_flops_per_token(self) -> float:
        """Online labels: teacher forward + backward to the SAE layer + SAE (`cocomix.flops`);
        hidden-state targets: the teacher's forward up to `sae.layer`. Cached labels: 0 (extracted before)."""
        if self.teacher is None:
            return 0.0
        T, layer = self.cfg.train.block_size, self.cfg.sae.layer
        if self.sae is not None:
            return float(concept_label_flops_per_token(self.teacher, layer, self.cfg.sae.n_latents, T,
                                                       self.cfg.concept.scoring))
        below, d = layer + 1, self.teacher.config.n_embd  # blocks 0..layer, forward only
        return float(2 * below * block_params(self.teacher) + 4 * below * d * T)

    def one_off_flops(self) -> dict[str, tuple[float | None, str]]:
        """The teacher's training, the SAE's and, with cached labels, their extraction (every train and
        val block of the cache); none when the run reads no teacher (concept.lam=0)."""
        cfg = self.cfg
        if self.teacher is None and self.label_cache is None:
            return {}
        out = {"teacher_training": teacher_training_flops(cfg)}
        needs_sae = self.sae is not None or self.label_cache is not None
        if not needs_sae:
            return out
        shape, T, layer = teacher_shape(cfg), cfg.train.block_size, cfg.sae.layer
        if cfg.sae.path:
            out["sae_training"] = (None, "not counted (a given SAE, sae.path)")
        else:
            per = sae_training_flops_per_token(shape, layer, cfg.sae.n_latents, cfg.sae.k, cfg.sae.aux_k, T)
            out["sae_training"] = (float(per * cfg.sae.tokens), f"counted: {cfg.sae.tokens:,} activation tokens")
        if self.label_cache is not None:
            tokens = sum(int(e["n_blocks"]) for e in self.label_cache.manifest["splits"].values()) * T
            per = concept_label_flops_per_token(shape, layer, cfg.sae.n_latents, T, cfg.concept.scoring)
            out["label_extraction"] = (float(per * tokens), f"counted: {tokens:,} labelled tokens (train + val)")
        return out


def _teacher_width(cfg: Config) -> int:
    """The teacher's hidden width from its config.json (ours and GPT-2's call it n_embd, others hidden_size)."""
    config_file = teacher_dir(cfg) / "config.json"  # a one-line error when there is no teacher
    if not config_file.is_file():
        raise ConfigError(f"config key 'teacher.path': {config_file} not found")
    config = read_json(config_file)
    return int(config["n_embd"] if "n_embd" in config else config["hidden_size"])
