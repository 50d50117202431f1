"""A TopK sparse autoencoder on the teacher's residual stream, in the convention of OpenAI's
GPT-2 SAEs (spec 1.1), so the paper's own SAE loads into the same class.

    x̃, μ, σ = LN(x)                       per-token normalisation, unbiased std, no affine
    c_pre   = W_enc (x̃ - b_pre) + b_lat    (C,)
    c       = ReLU(TopK_k(c_pre))          k non-zeros at most
    x̂       = (W_dec c + b_pre) σ + μ      decode = gather of the k active columns of W_dec

Parameter names equal OpenAI's state-dict keys (`pre_bias`, `encoder.weight` (C, d),
`latent_bias`, `decoder.weight` (d, C), buffer `stats_last_nonzero`). Training (`train_sae`)
follows Gao et al. 2024: decoder columns kept at unit norm, encoder initialised as the decoder's
transpose, AuxK loss on dead latents, activations streamed from the teacher through a bounded
shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cocomix.config import Config, ConfigError, SAEConfig
from cocomix.data import DataError
from cocomix.data.shards import BlockOrder, TokenBlocks
from cocomix.faults import point
from cocomix.saelens import WEIGHTS as SAELENS_WEIGHTS, is_saelens, read_saelens
from cocomix.files import atomic_write_json, follow_umask, read_json, sha256_file
from cocomix.model import token_nll
from cocomix.progress import Reporter, si
from cocomix.teacher import load_teacher, run_teacher, teacher_hash
from cocomix.records import environment_info
from cocomix.tracking import open_tracker

WEIGHTS = "sae.safetensors"
SAE_CONFIG = "sae_config.json"
METRICS = "metrics.json"
LN_EPS = 1e-5


def layer_norm(x: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec 1.1 normalisation: (x - μ) / (σ + eps) with torch's unbiased std; returns (x̃, μ, σ)."""
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + eps), mu, std


class TopKSAE(nn.Module):
    def __init__(self, d_model: int, n_latents: int, k: int, normalize: bool = True):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ConfigError(f"config key 'sae.k': {k} must be in [1, n_latents={n_latents}]")
        self.d_model, self.n_latents, self.k, self.normalize = d_model, n_latents, k, normalize
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.encoder = nn.Linear(d_model, n_latents, bias=False)  # weight (C, d)
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.decoder = nn.Linear(n_latents, d_model, bias=False)  # weight (d, C): one column per latent
        # Tokens since each latent last fired (OpenAI counts steps; the meaning only matters in training).
        self.register_buffer("stats_last_nonzero", torch.zeros(n_latents, dtype=torch.long))

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        """(d, C) dictionary; column j is latent j's direction (unit norm for SAEs trained here)."""
        return self.decoder.weight

    # ---- the equations ----

    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.normalize:
            return x, {}
        x, mu, std = layer_norm(x)
        return x, {"mu": mu, "std": std}

    def encode_pre_act(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """c_pre = W_enc (x̃ - b_pre) + b_lat: (..., C) dense."""
        return F.linear(x_normalized - self.pre_bias, self.encoder.weight, self.latent_bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (..., d) -> (top_acts (..., k) after ReLU, top_indices (..., k) sorted by pre-activation
        descending, info with the normalisation statistics μ, σ (..., 1))."""
        x_normalized, info = self.preprocess(x)
        top = self.encode_pre_act(x_normalized).topk(self.k, dim=-1, sorted=True)
        return F.relu(top.values), top.indices, info

    def decode_normalized(self, top_acts: torch.Tensor, top_indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """W_dec c (+ b_pre) in the normalised space, as a gather of the k active columns:
        never a dense C-wide vector (sparsify's embedding_bag trick)."""
        lead = top_acts.shape[:-1]
        out = F.embedding_bag(
            top_indices.reshape(-1, top_indices.size(-1)),  # (N, k)
            self.W_dec.t(),                                  # (C, d): row j = column j of W_dec
            per_sample_weights=top_acts.reshape(-1, top_acts.size(-1)).to(self.W_dec.dtype),
            mode="sum",
        ).view(*lead, self.d_model)  # (..., d)
        return out + self.pre_bias if bias else out

    def decode(self, top_acts: torch.Tensor, top_indices: torch.Tensor, info: dict[str, torch.Tensor]) -> torch.Tensor:
        """x̂ = (W_dec c + b_pre) σ + μ: back in the activation space."""
        out = self.decode_normalized(top_acts, top_indices)
        if self.normalize:
            out = out * info["std"] + info["mu"]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂ of x."""
        return self.decode(*self.encode(x))

    # ---- unit-norm decoder (Gao et al. 2024) ----

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component along each (unit) column, so Adam moves columns on the sphere."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(dim=0, keepdim=True) * self.W_dec)

    # ---- SAELens's and OpenAI's published formats ----

    @classmethod
    def from_saelens(cls, folder) -> "TopKSAE":
        """A SAELens TopK SAE folder (cocomix/saelens.py: `read_saelens`), encodings identical."""
        shape, tensors = read_saelens(folder)
        sae = cls(**shape)
        sae.load_state_dict(tensors, strict=False)  # the stats buffer keeps its zeros
        return sae

    @classmethod
    def from_openai_state_dict(cls, state: dict, source: str = "state dict") -> "TopKSAE":
        """Build from an OpenAI `sparse_autoencoder` Autoencoder state dict (e.g. the paper's
        `v5_32k/autoencoders/5.pt`): tensors `pre_bias`, `encoder.weight` (C, d), `latent_bias`,
        `decoder.weight` (d, C), optional stats buffers, and `activation: "TopK"` with
        `activation_state_dict: {"k": 32, "postact_fn": "ReLU"}`. Their `normalize` flag is implied
        by the TopK activation (as in their `from_state_dict`)."""
        state = dict(state)
        for key in ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight"):
            if key not in state:
                raise DataError(f"{source}: missing key '{key}' (not an OpenAI sparse_autoencoder state dict)")
        activation = state.pop("activation", "ReLU")
        act_state = state.pop("activation_state_dict", {}) or {}
        if activation != "TopK" or "k" not in act_state:
            raise DataError(f"{source}: activation {activation!r} is not a TopK SAE (expected activation 'TopK' with k)")
        if act_state.get("postact_fn", "ReLU") != "ReLU":
            raise DataError(f"{source}: TopK post-activation {act_state['postact_fn']!r}, expected 'ReLU'")
        n_latents, d_model = state["encoder.weight"].shape
        if tuple(state["decoder.weight"].shape) != (d_model, n_latents):
            raise DataError(f"{source}: decoder.weight has shape {tuple(state['decoder.weight'].shape)}, "
                            f"expected ({d_model}, {n_latents})")
        sae = cls(d_model, n_latents, int(act_state["k"]), normalize=True)
        tensors = {k: state[k].float() for k in ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight")}
        if "stats_last_nonzero" in state:
            tensors["stats_last_nonzero"] = state["stats_last_nonzero"].long()
        sae.load_state_dict(tensors, strict=False)  # other stats buffers of theirs are not used
        return sae


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


def sae_path(cfg: Config) -> Path:
    """`sae.path` if set (ours or OpenAI's .pt), else the folder `train-sae` writes."""
    return Path(cfg.sae.path) if cfg.sae.path else cfg.experiment_dir / "sae"


def sae_hash(cfg: Config) -> str:
    """sha256 of the SAE's weights: its identity in label caches."""
    p = sae_path(cfg)
    f = (p / SAELENS_WEIGHTS if is_saelens(p) else p / WEIGHTS) if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"SAE {p}: not found (run `cocomix train-sae` or set sae.path)")
    return sha256_file(f)


def load_sae(cfg: Config, device: torch.device | str = "cpu") -> TopKSAE:
    """The SAE of `sae.path` (our folder, or an OpenAI state-dict file) or `<experiment_dir>/sae/`.
    Its size must agree with `sae.n_latents` and `sae.k`, which downstream modules are built from."""
    p = sae_path(cfg)
    if p.is_dir() and (p / SAE_CONFIG).is_file() and (p / WEIGHTS).is_file():
        from safetensors.torch import load_file

        try:
            meta = read_json(p / SAE_CONFIG)
            assert isinstance(meta, dict) and {"d_model", "n_latents", "k"} <= meta.keys()
        except (ValueError, AssertionError):
            raise DataError(f"SAE {p / SAE_CONFIG}: not a valid SAE config (damaged; re-run `cocomix train-sae`)") from None
        if meta.get("weights_sha256") not in (None, sha256_file(p / WEIGHTS)):
            raise DataError(f"SAE {p / WEIGHTS}: does not match its sha256 in {SAE_CONFIG} (damaged; re-run "
                            "`cocomix train-sae`)")
        try:
            sae = TopKSAE(meta["d_model"], meta["n_latents"], meta["k"], meta.get("normalize", True))
            sae.load_state_dict(load_file(str(p / WEIGHTS)))
        except Exception as e:  # noqa: BLE001 - a header or tensor safetensors cannot read
            raise DataError(f"SAE {p / WEIGHTS}: cannot be read ({str(e).splitlines()[0][:120]}); re-run "
                            "`cocomix train-sae`") from None
        if meta.get("layer") is not None and meta["layer"] != cfg.sae.layer:
            raise ConfigError(f"config key 'sae.layer': {cfg.sae.layer}, but the SAE in {p} was trained on layer {meta['layer']}")
    elif is_saelens(p):  # a SAELens folder (cocomix/saelens.py)
        sae = TopKSAE.from_saelens(p)
    elif p.is_file():
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
            raise DataError(f"SAE {p}: cannot read as a torch state dict ({str(e).splitlines()[0]})") from None
        if not isinstance(state, dict):
            raise DataError(f"SAE {p}: expected a state dict, got {type(state).__name__}")
        sae = TopKSAE.from_openai_state_dict(state, source=f"SAE {p}")
    else:
        raise DataError(f"SAE {p}: not found (run `cocomix train-sae` or set sae.path)")
    for key, want, got in (("sae.n_latents", cfg.sae.n_latents, sae.n_latents), ("sae.k", cfg.sae.k, sae.k)):
        if want != got:
            raise ConfigError(f"config key '{key}': {want}, but the SAE in {p} has {got}")
    return sae.to(device).eval().requires_grad_(False)


def save_sae(sae: TopKSAE, folder: Path, meta: dict | None = None) -> None:
    """Write `sae.safetensors` and `sae_config.json` (sizes, `layer`, provenance in `meta`) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(folder / WEIGHTS))
    follow_umask(folder / WEIGHTS)  # safetensors writes 0600
    config = {"format": "cocomix-topk-sae-v1", "d_model": sae.d_model, "n_latents": sae.n_latents, "k": sae.k,
              "normalize": sae.normalize, **(meta or {}),
              "weights_sha256": sha256_file(folder / WEIGHTS)}  # last: an old config passed as meta cannot override it
    atomic_write_json(folder / SAE_CONFIG, config, indent=1)


# --------------------------------------------------------------------------------------
# Activations from the teacher
# --------------------------------------------------------------------------------------


@torch.no_grad()
def block_activations(teacher, blocks, indices, layer: int, device) -> torch.Tensor:
    """Teacher residual stream after block `layer` for blocks `indices`: (n * T, d) fp32."""
    ids = blocks.get_batch(indices).to(device)
    _, h = run_teacher(teacher, ids, layer, stop_at_layer=True)
    return h.reshape(-1, h.size(-1)).float()  # (n, T, d) -> (n*T, d)


def activation_batches(teacher, blocks, cfg: Config, device, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_tokens, d) batches of training activations, shuffled in a bounded buffer.

    Blocks are visited in a seeded order; the buffer (`sae.buffer_tokens`) is filled, shuffled,
    its first half emitted as batches, and the rest kept and topped up, so consecutive batches mix
    many documents while memory stays at one buffer.
    """
    s, T = cfg.sae, blocks.block_size
    order = BlockOrder(len(blocks), seed)
    per_forward = max(1, s.batch_tokens // T)
    size = max(s.buffer_tokens, 2 * s.batch_tokens)
    gen = torch.Generator().manual_seed(seed)
    buf = torch.empty(size, teacher.config.n_embd, device=device)
    filled, position = 0, 0
    while True:
        while filled < size:
            idx = order.take(position, per_forward)
            position += len(idx)
            h = block_activations(teacher, blocks, idx, cfg.sae.layer, device)
            take = min(len(h), size - filled)  # the rest of the last forward is dropped
            buf[filled : filled + take] = h[:take]
            filled += take
        buf = buf[torch.randperm(size, generator=gen).to(device)]
        emit = (size // 2) // s.batch_tokens * s.batch_tokens
        for i in range(0, emit, s.batch_tokens):
            yield buf[i : i + s.batch_tokens]
        buf[: size - emit] = buf[emit:].clone()
        filled = size - emit


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def normalized_mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the MSE of predicting the batch mean (Gao et al. 2024)."""
    return (recon - target).pow(2).mean() / (target.mean(dim=0) - target).pow(2).mean().clamp_min(1e-12)


def train_step_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coef: float):
    """Loss of one batch x (N, d): reconstruction in the normalised space + AuxK on dead latents.

    AuxK (Gao et al. 2024, sec. A.2): the top-`aux_k` dead latents reconstruct the residual error
    of the main reconstruction; this sends gradient to latents that TopK never selects.
    Returns (loss, main_mse, aux_mse, top_acts, top_indices).
    """
    x_normalized, _ = sae.preprocess(x)
    pre = sae.encode_pre_act(x_normalized)  # (N, C)
    top = pre.topk(sae.k, dim=-1)
    top_acts = F.relu(top.values)
    recon = sae.decode_normalized(top_acts, top.indices)
    mse = normalized_mse(recon, x_normalized)
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if n_dead > 0 and aux_coef > 0:
        aux_top = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, n_dead), dim=-1)
        error = (x_normalized - recon).detach()
        aux_recon = sae.decode_normalized(F.relu(aux_top.values), aux_top.indices, bias=False)
        aux = normalized_mse(aux_recon, error)
    return mse + aux_coef * aux, mse.detach(), aux.detach(), top_acts.detach(), top.indices


def init_sae(cfg: Config, d_model: int, first_batch: torch.Tensor, seed: int) -> TopKSAE:
    """Random unit-norm decoder columns, encoder = decoder transpose, pre-bias = the mean normalised
    input (Gao et al. use the geometric median; the mean is close and needs no iterations)."""
    torch.manual_seed(seed)
    sae = TopKSAE(d_model, cfg.sae.n_latents, cfg.sae.k).to(first_batch.device)
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.normalize_decoder_()
        sae.encoder.weight.copy_(sae.W_dec.t())
        sae.pre_bias.copy_(sae.preprocess(first_batch)[0].mean(dim=0))
    return sae


def train_sae(cfg: Config, progress: bool = True) -> dict[str, float]:
    """`cocomix train-sae`: train on training-split activations, evaluate on held-out blocks, and
    write `<experiment_dir>/sae/` (weights, config, metrics.json) atomically. Returns the metrics."""
    _check_train_settings(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg, device)
    train_blocks = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size, verify="size")
    val_blocks = TokenBlocks(cfg.data_dir, "val", cfg.train.block_size, verify="size")
    if len(train_blocks) == 0 or len(val_blocks) == 0:
        raise DataError(f"{cfg.data_dir}: a split has fewer tokens than one block of {cfg.train.block_size}")

    out = sae_path(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = environment_info()
    tags = {"experiment": cfg.experiment, "method": "sae", "seed": str(cfg.seed), "role": "sae",
            "git_commit": env["git_commit"], "device": env["device"]}
    tracker = open_tracker(dataclasses.replace(cfg, run_name="sae"), tmp, tags, source="cocomix train-sae")
    status = "FAILED"
    try:
        sae, n_steps = _fit_sae(cfg, teacher, train_blocks, tracker, device, progress)
        metrics = _final_metrics(cfg, sae, teacher, val_blocks, n_steps, device)
        tracker.log({"step": n_steps, "tokens_seen": n_steps * cfg.sae.batch_tokens,
                     **{f"sae/{k}": v for k, v in metrics.items()}})
        _write_sae(cfg, sae, tmp, metrics, tracker, env)
        status = "FINISHED"
    finally:
        tracker.finish(status)
        if status != "FINISHED":
            shutil.rmtree(tmp, ignore_errors=True)
    _swap_in(tmp, out)
    return metrics


def _check_train_settings(cfg: Config) -> None:
    s = cfg.sae
    if cfg.sae.path:
        raise ConfigError(f"config key 'sae.path': set to {cfg.sae.path}; train-sae trains a new SAE, unset it")
    if s.batch_tokens <= 0 or s.tokens < s.batch_tokens:
        raise ConfigError(f"config key 'sae.tokens': {s.tokens} is less than one batch of sae.batch_tokens={s.batch_tokens}")


def _fit_sae(cfg: Config, teacher, train_blocks, tracker, device, progress: bool) -> tuple[TopKSAE, int]:
    """Train a fresh SAE for `sae.tokens // sae.batch_tokens` steps, logging every
    `train.log_every_steps`; returns (the SAE in eval mode, the number of steps)."""
    s = cfg.sae
    seed = cfg.seed + 7919  # its own stream: the SAE's data order is not the student's
    batches = activation_batches(teacher, train_blocks, cfg, device, seed)
    first = next(batches)
    sae = init_sae(cfg, teacher.config.n_embd, first, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=6.25e-10)
    n_steps = s.tokens // s.batch_tokens
    # A bar on a terminal, else a plain line at the log steps about every 10% (values already read).
    reporter = Reporter("train-sae", n_steps, "step", progress)
    t0 = time.perf_counter()
    x = first
    for step in range(1, n_steps + 1):
        loss, mse, aux, dead = _sae_step(sae, opt, x, s)
        point("sae.step")
        reporter.update(1)
        if step % cfg.train.log_every_steps == 0 or step == n_steps:
            record = {"sae/loss": loss.item(), "sae/nmse": mse.item(), "sae/auxk": aux.item(),
                      "sae/dead_fraction": dead.float().mean().item(),
                      "sae/tokens_per_s": step * s.batch_tokens / (time.perf_counter() - t0)}
            tracker.log({"step": step, "tokens_seen": step * s.batch_tokens, **record})
            if reporter.due():
                reporter.line(f"train-sae step {step}/{n_steps} tokens {step * s.batch_tokens:,} "
                              f"nmse {record['sae/nmse']:.4f} auxk {record['sae/auxk']:.4f} "
                              f"dead {record['sae/dead_fraction']:.3f} {si(record['sae/tokens_per_s'])} tok/s")
        if step < n_steps:
            x = next(batches)
    reporter.close()
    sae.eval().requires_grad_(False)
    return sae, n_steps


def _sae_step(sae: TopKSAE, opt, x: torch.Tensor, s: SAEConfig) -> tuple[torch.Tensor, ...]:
    """One optimiser step on the batch x (N, d): decoder gradient projected and columns renormalised
    around it, then each latent's tokens-since-it-fired counter updated. Returns (loss, mse, aux, dead)."""
    dead = sae.stats_last_nonzero >= s.dead_after_tokens
    loss, mse, aux, top_acts, top_indices = train_step_loss(sae, x, dead, s.aux_k, s.aux_coef)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.project_decoder_grad_()
    opt.step()
    sae.normalize_decoder_()
    with torch.no_grad():
        fired = torch.zeros(s.n_latents, dtype=torch.bool, device=x.device)
        fired[top_indices[top_acts > 0]] = True
        sae.stats_last_nonzero += len(x)
        sae.stats_last_nonzero[fired] = 0
    return loss, mse, aux, dead


def _final_metrics(cfg: Config, sae: TopKSAE, teacher, val_blocks, n_steps: int, device) -> dict[str, float]:
    """Held-out metrics (`evaluate_sae`) plus the final dead fraction and the training tokens."""
    metrics = evaluate_sae(sae, teacher, val_blocks, cfg, device)
    metrics["dead_fraction"] = float((sae.stats_last_nonzero >= cfg.sae.dead_after_tokens).float().mean())
    metrics["train_tokens"] = n_steps * cfg.sae.batch_tokens
    return metrics


def _write_sae(cfg: Config, sae: TopKSAE, tmp: Path, metrics: dict, tracker, env: dict) -> None:
    """Weights and sae_config.json, then metrics.json (with the tracked run's id), into `tmp`; both
    JSON files are logged as artifacts."""
    s = cfg.sae
    save_sae(sae, tmp, {"layer": s.layer, "teacher_path": str(cfg.teacher.path), "teacher_sha256": teacher_hash(cfg),
                        "data_dir": str(cfg.data_dir), "sae_config": dataclasses.asdict(s), "environment": env})
    metrics.update(tracker.ids())
    atomic_write_json(tmp / METRICS, metrics, indent=1)
    tracker.log_artifact(tmp / METRICS)
    tracker.log_artifact(tmp / SAE_CONFIG)


def _swap_in(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; an older SAE is replaced only once the new one is complete."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
        point("sae.swap")  # the old SAE aside, the new one not in place yet
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, teacher, val_blocks, cfg: Config, device) -> dict[str, float]:
    """Held-out quality on the first `eval.max_blocks` validation blocks:

    fvu             Σ‖x - x̂‖² / Σ‖x - x̄‖² in the activation space (x̄: mean over held-out tokens)
    l0              mean number of non-zero latents per token (TopK + ReLU: at most k)
    heldout_inactive_fraction  latents that never fire on the held-out tokens
    loss_clean, loss_spliced, loss_increase   teacher next-token loss with its activation
                    replaced by the reconstruction (the SAE's cost in the teacher's own terms)
    recovery/*      synthetic corpus only: see `concept_recovery`
    """
    n = len(val_blocks) if cfg.eval.max_blocks is None else min(cfg.eval.max_blocks, len(val_blocks))
    sq_err = sum_x = sum_x2 = 0.0
    tokens, nonzero = 0, 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    loss_clean = loss_spliced = 0.0
    codes, concepts = [], []
    for a in range(0, n, cfg.eval.batch_size):
        idx = np.arange(a, min(n, a + cfg.eval.batch_size))
        ids = val_blocks.get_batch(idx).to(device)
        logits, h = run_teacher(teacher, ids, cfg.sae.layer)
        x = h.reshape(-1, h.size(-1)).double()  # (B*T, d)
        top_acts, top_indices, info = sae.encode(h.float())
        recon = sae.decode(top_acts, top_indices, info).reshape(-1, h.size(-1)).double()
        sq_err += (x - recon).pow(2).sum().item()
        sum_x = sum_x + x.sum(dim=0)
        sum_x2 += x.pow(2).sum().item()
        tokens += len(x)
        nonzero += (top_acts > 0).sum().item()
        fired[top_indices[top_acts > 0]] = True
        loss_clean += token_nll(logits, ids).mean(dim=1).sum().item()
        spliced, _ = run_teacher(teacher, ids, cfg.sae.layer, edit=lambda hh: sae(hh))
        loss_spliced += token_nll(spliced, ids).mean(dim=1).sum().item()
        if val_blocks.has_concepts:
            codes.append((top_acts.reshape(-1, sae.k).cpu(), top_indices.reshape(-1, sae.k).cpu()))
            concepts.append(val_blocks.get_concepts(idx).reshape(len(x), -1))  # (B*T, n_slots)
    total_var = sum_x2 - (sum_x.pow(2).sum().item() / tokens)
    metrics = {
        "fvu": sq_err / total_var,
        "l0": nonzero / tokens,
        "heldout_inactive_fraction": 1.0 - fired.float().mean().item(),
        "loss_clean": loss_clean / n,
        "loss_spliced": loss_spliced / n,
        "loss_increase": (loss_spliced - loss_clean) / n,
        "heldout_tokens": tokens,
    }
    if codes:
        acts = torch.cat([c[0] for c in codes])
        inds = torch.cat([c[1] for c in codes])
        random_sae = init_sae(cfg, sae.d_model, torch.zeros(2, sae.d_model), seed=cfg.seed + 1).to(device)
        metrics.update(concept_recovery(acts, inds, sae.n_latents, np.concatenate(concepts),
                                        untrained=(random_sae, teacher, val_blocks, n, cfg, device)))
    return metrics


def auroc_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every score column as a detector of every label column: (N, C), (N, M) bool -> (M, C).

    Mann-Whitney form with average ranks, so ties (most latents are 0 on most tokens) count 1/2.
    """
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0, method="average")  # (N, C)
    pos = labels.sum(axis=0).astype(np.float64)  # (M,)
    neg = len(labels) - pos
    rank_sum = labels.T.astype(np.float64) @ ranks  # (M, C)
    return (rank_sum - (pos * (pos + 1) / 2)[:, None]) / (pos * neg)[:, None]


def _dense_codes(acts: torch.Tensor, inds: torch.Tensor, n_latents: int) -> np.ndarray:
    dense = torch.zeros(len(acts), n_latents)
    dense.scatter_(1, inds, acts.float())  # (N, C); only for evaluation on a bounded token sample
    return dense.numpy()


def concept_auroc(acts, inds, n_latents: int, token_concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC of every latent's activation as a detector of every ground-truth concept id > 0 that is
    present on some but not all tokens (a token has a concept if any of its slots holds it).

    acts, inds: (N, k) SAE codes; token_concepts: (N, n_slots). Returns (concept ids (M,),
    labels (N, M) bool, auc (M, C)). Builds the dense (N, C) codes: keep N * C bounded.
    """
    ids, labels = concept_labels(token_concepts)
    return ids, labels, auroc_matrix(_dense_codes(acts, inds, n_latents), labels)  # (M, C)


def concept_labels(token_concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(concept ids (M,), labels (N, M) bool): every concept id > 0 present on some but not all tokens."""
    ids = np.unique(token_concepts)
    ids = ids[ids > 0]
    labels = np.stack([(token_concepts == c).any(axis=1) for c in ids], axis=1)  # (N, M)
    keep = (labels.sum(axis=0) > 0) & (labels.sum(axis=0) < len(labels))
    return ids[keep], labels[:, keep]


def concept_recovery(acts, inds, n_latents: int, token_concepts: np.ndarray, untrained=None,
                     max_elements: int = 50_000_000) -> dict[str, float]:
    """How well SAE latents detect the synthetic corpus's ground-truth concepts.

    For each concept id > 0 present in the sample (a token has it if any slot holds it), the AUROC
    of every latent's activation as a detector; reported:
      recovery/best_auroc         mean over concepts of the best latent's AUROC
      recovery/random_auroc       mean over concepts of a uniformly random latent's AUROC (the
                                  average over latents: the expected value of picking one blindly)
      recovery/untrained_best_auroc  best-latent AUROC of an untrained SAE of the same size (controls
                                  for picking the max over many latents)
      recovery/top8_auroc         a concept spread over a few latents (one per word cluster, say): per
                                  concept the 8 best latents on the first half of the tokens, their
                                  standardised activations summed, AUROC on the second half (held out)
      recovery/untrained_top8_auroc  the same for the untrained SAE
    """
    n_tokens = min(len(acts), max(1, max_elements // n_latents))  # bounds the dense (N, C) matrix
    _, labels = concept_labels(token_concepts[:n_tokens])
    dense = _dense_codes(acts[:n_tokens], inds[:n_tokens], n_latents)  # (N, C), for both numbers below
    auc = auroc_matrix(dense, labels)
    out = {
        "recovery/n_concepts": int(labels.shape[1]),
        "recovery/best_auroc": float(auc.max(axis=1).mean()),
        "recovery/random_auroc": float(auc.mean(axis=1).mean()),
    }
    if untrained is not None:
        sae, teacher, val_blocks, n, cfg, device = untrained
        acts_u, inds_u, got = [], [], 0
        for a in range(0, n, cfg.eval.batch_size):
            if got >= n_tokens:
                break
            h = block_activations(teacher, val_blocks, np.arange(a, min(n, a + cfg.eval.batch_size)), cfg.sae.layer, device)
            top_acts, top_indices, _ = sae.encode(h)
            acts_u.append(top_acts.cpu())
            inds_u.append(top_indices.cpu())
            got += len(h)
        dense_u = _dense_codes(torch.cat(acts_u)[:n_tokens], torch.cat(inds_u)[:n_tokens], n_latents)
        out["recovery/untrained_best_auroc"] = float(auroc_matrix(dense_u, labels).max(axis=1).mean())
        out["recovery/untrained_top8_auroc"] = top_k_auroc(dense_u, labels, TOP_K_LATENTS)
    out["recovery/top8_auroc"] = top_k_auroc(dense, labels, TOP_K_LATENTS)
    return out


TOP_K_LATENTS = 8  # recovery/top8_auroc


def top_k_auroc(dense: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean over concepts of the held-out AUROC of k latents together: on the first half of the tokens
    the k latents with the highest AUROC for the concept are picked, each divided by its standard
    deviation there; their sum is scored on the second half. A concept needs positives in both halves."""
    half = len(dense) // 2
    fit, test = slice(0, half), slice(half, None)
    keep = (labels[fit].any(axis=0) & ~labels[fit].all(axis=0) & labels[test].any(axis=0)
            & ~labels[test].all(axis=0))
    if not keep.any():
        return float("nan")
    auc = auroc_matrix(dense[fit], labels[fit][:, keep])  # (M, C)
    scaled = dense[test] / (dense[fit].std(axis=0) + 1e-12)
    held_out = labels[test][:, keep]
    scores = [float(auroc_matrix(scaled[:, np.argsort(-row)[:k]].sum(axis=1, keepdims=True), held_out[:, [m]])[0, 0])
              for m, row in enumerate(auc)]
    return float(np.mean(scores))
