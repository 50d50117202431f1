"""Model-side modules of the methods that change the backbone: what acts on the residual stream
after `insert_layer` blocks, and what the LM head reads.

The backbone (`cocomix.model`) knows only the `Slot` interface; it never branches on a method's
name. A slot module says

    streams           positions per token in the blocks above it (2: a slot interleaved after each token)
    forward(h)        the new stream, (B, T, d) -> (B, streams * T, d), and any prediction to return
    readout(x)        which of the streams the LM head reads, (B, streams * T, d) -> (B, T, d)
    flops_params()    the weights a token's forward multiplies through (for FLOPs per token)
    inactive_params() stored parameters a token does not use (for active-parameter accounting)
    init_weights()    its own initialisation
    all_params_reach_stream  False when some parameters may get no gradient from the LM loss
                      (DDP must then look for unused parameters)

and declares its fields of `CocomixConfig.slot_options` as a small dataclass (`Options`), so a
checkpoint rebuilds itself. Register a new slot with `@register_slot`; its method (one module in
`baselines/` or `cocomix/methods/`) names it in `Method.slot` and fills the options from its config section.

Like `model.py`, this file imports only torch: checkpoints ship it next to `model.py` so they load
with `trust_remote_code=True` without the `cocomix` package.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOTS: dict = {}  # slot name -> Slot subclass


def register_slot(cls):
    SLOTS[cls.name] = cls
    return cls


def interleave(h, slot):
    """(h_1..h_T), (s_1..s_T) -> (h_1, s_1, ..., h_T, s_T): each slot right after its token (spec 1.5).
    (B, T, d) x2 -> (B, 2T, d)"""
    B, T, d = h.shape
    return torch.stack([h, slot], dim=2).view(B, 2 * T, d)


class Slot(nn.Module):
    name = "slot"
    streams = 1
    all_params_reach_stream = True

    @dataclass
    class Options:
        pass

    def __init__(self, config):
        super().__init__()
        self.options = self.Options(**(config.slot_options or {}))  # CocomixConfig has checked them
        self.n_embd = config.n_embd

    def forward(self, h, steering=None):
        raise NotImplementedError

    def readout(self, x):
        """(B, streams * T, d) -> (B, T, d). Interleaved: the slot after token t predicts token t+1, or
        token t's own position when the slot's options say `readout: token` (pause and concept ablations)."""
        if self.streams == 1:
            return x
        first = 0 if getattr(self.options, "readout", None) == "token" else self.streams - 1
        return x[:, first :: self.streams]

    def flops_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def inactive_params(self) -> int:
        return 0

    def init_weights(self, init, std: float) -> None:
        pass


# ---- pause tokens (spec 3) ---------------------------------------------------------------------


@register_slot
class PauseSlot(Slot):
    """One learnable vector, shared by every position, interleaved after every token. The LM head reads
    the pause slots (`readout: pause`, as CoCoMix reads its concept slots) or the token slots
    (`readout: token`: the pause slots are then extra positions later tokens attend to)."""

    name = "pause"
    streams = 2

    @dataclass
    class Options:
        readout: str = "pause"

        def __post_init__(self):
            if self.readout not in ("pause", "token"):
                raise ValueError(f"pause readout must be 'pause' or 'token', got {self.readout!r}")

    def __init__(self, config):
        super().__init__(config)
        self.embedding = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, h, steering=None):
        return interleave(h, self.embedding.to(h.dtype).expand_as(h)), None

    def flops_params(self) -> int:
        return 0  # a broadcast, no matmul

    def init_weights(self, init, std: float) -> None:
        init.normal_(self.embedding, mean=0.0, std=std)


# ---- CoCoMix's concept head (spec 1.3-1.5) -----------------------------------------------------


def normalize_per_token(x, eps: float = 1e-5):
    """The SAE's input normalisation (spec 1.1), reused by the concept head (spec 1.3): per-token mean
    and *unbiased* std, no affine. Returns (x_tilde, mu, sigma), the latter two (..., 1)."""
    mu = x.mean(-1, keepdim=True)
    sigma = x.std(-1, keepdim=True)  # torch default: unbiased (N-1), as the official code
    return (x - mu) / (sigma + eps), mu, sigma


def sparse_compress(values, indices, table):
    """W @ TopK(z) without the C-wide sparse vector: sum_j values[..., j] * table[indices[..., j]].

    values, indices: (..., k); table: (C, d), row c = column c of the paper's W in R^{d x C}.
    One fused gather-and-weighted-sum (embedding_bag); gradients flow to the k rows and the values.
    """
    k, d = indices.shape[-1], table.shape[-1]
    flat = F.embedding_bag(indices.reshape(-1, k), table, mode="sum",
                           per_sample_weights=values.reshape(-1, k).to(table.dtype))  # (N, d)
    return flat.view(*indices.shape[:-1], d)


@dataclass
class ConceptPrediction:
    logits: torch.Tensor           # (B, T, C) z_t, dense (the concept loss needs every logit); hidden target: (B, T, D)
    indices: torch.Tensor | None   # (B, T, k) the TopK concepts kept for compression (None for the hidden target)
    values: torch.Tensor | None    # (B, T, k) their raw logits (after steering)
    norm_ratio: torch.Tensor | None = None  # () mean over positions of ||c_t - mu_t|| / ||h_t - mu_t|| (no grad)


MIX_MODES = ("interleave", "add", "none")


class _MixingSlot(Slot):
    """Predict a continuous concept c_t from h_t (`predict`), then mix it into the stream: interleave
    (h_1, c_1, ..., h_T, c_T) (CoCoMix), add it to h_t (the intervention ablation), or leave the
    stream alone (prediction only) (spec 1.5 and 3). Interleaved, the LM head reads the concept slot
    after token t (`readout: concept`, the paper and the official code) or token t's own slot
    (`readout: token`, an ablation)."""

    def __init__(self, config):
        super().__init__(config)
        if self.options.mix not in MIX_MODES:
            raise ValueError(f"concept mix must be one of {list(MIX_MODES)}, got {self.options.mix!r}")
        if self.options.readout not in ("concept", "token"):
            raise ValueError(f"concept readout must be 'concept' or 'token', got {self.options.readout!r}")
        if self.options.readout == "token" and self.options.mix != "interleave":
            raise ValueError(f"concept readout 'token' needs mix 'interleave', got {self.options.mix!r}")
        self.streams = 2 if self.options.mix == "interleave" else 1
        # Prediction only: the compressed concept is computed but never enters the stream.
        self.all_params_reach_stream = self.options.mix != "none"
        self.pre_bias = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, h, steering=None):
        concept, prediction = self.predict(h, steering)
        if self.options.mix == "interleave":
            return interleave(h, concept), prediction  # (B, 2T, d)
        if self.options.mix == "add":
            return h + concept, prediction  # h_t <- h_t + c_t
        return h, prediction  # prediction only: the stream is unchanged


@register_slot
class ConceptSlot(_MixingSlot):
    """z_t = W_p (LN(h_t) - b_pre) + b_p; keep TopK_k(z_t) with raw values (no ReLU);
    c_t = (W_c TopK(z_t) + b_c + b_pre) * sigma_t + mu_t. This mirrors the SAE encoder/decoder as
    the official code does (spec 1.3-1.4); the paper's bare c_t = W TopK(z_t) + b is the same up to
    the normalisation. mu_t, sigma_t are the student's own per-token statistics."""

    name = "concept"

    @dataclass
    class Options:
        n_concepts: int = 0   # C, the SAE dictionary size
        k: int = 32           # TopK of z_t kept for compression
        mix: str = "interleave"
        readout: str = "concept"  # "token": the LM head reads token t's own slot (an ablation)
        init_scale: float = 1.0   # times init_std for the predictor and compression weights (a departure)

        def __post_init__(self):
            if not 0 < self.k <= self.n_concepts:
                raise ValueError(f"concept_k={self.k} must be in [1, n_concepts={self.n_concepts}]")
            if not self.init_scale > 0:
                raise ValueError(f"concept init_scale must be positive, got {self.init_scale}")

    def __init__(self, config):
        super().__init__(config)
        d, C = config.n_embd, self.options.n_concepts
        self.n_concepts, self.k = C, self.options.k
        self.predictor = nn.Linear(d, C)
        self.compress = nn.Embedding(C, d)  # (C, d): gathering k rows = using k columns of W (spec 1.7)
        self.compress_bias = nn.Parameter(torch.zeros(d))
        # N(0, init_std * init_scale) for both (read by the model's _init_weights; 1.0: the official init).
        # The slot's norm relative to its token's, ~ init_std^2 sqrt(d k) times the top-k order statistic
        # of C draws, scales with init_scale^2.
        self.predictor.init_std_scale = self.compress.init_std_scale = self.options.init_scale

    def predict(self, h, steering: dict[int, float] | None = None):
        u, mu, sigma = normalize_per_token(h)
        logits = self.predictor(u - self.pre_bias)  # (B, T, C)
        if steering:
            # The paper's steering (spec 4.7): scale chosen concept logits before TopK and compression.
            scale = torch.ones(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            scale[list(steering)] = torch.tensor(list(steering.values()), device=logits.device, dtype=logits.dtype)
            logits = logits * scale
        values, indices = logits.topk(self.k, dim=-1)  # (B, T, k) raw values, may be negative (code)
        concept = sparse_compress(values, indices, self.compress.weight) + self.compress_bias + self.pre_bias
        centred = concept * sigma  # c_t - mu_t
        ratio = None
        if self.training:  # how much the slot carries next to its token (train/slot_norm_ratio); not at inference
            with torch.no_grad():
                ratio = (centred.float().norm(dim=-1) / (h - mu).float().norm(dim=-1).clamp_min(1e-12)).mean()
        concept = centred + mu  # de-normalise with h_t's own statistics
        return concept.to(h.dtype), ConceptPrediction(logits, indices, values, ratio)

    def flops_params(self) -> int:
        # the dense predictor, and of the compression only the k gathered rows (spec 1.7) and its bias
        d = self.n_embd
        return sum(p.numel() for p in self.predictor.parameters()) + self.pre_bias.numel() + self.k * d + d

    def inactive_params(self) -> int:
        return (self.n_concepts - self.k) * self.n_embd  # only k of the C rows are gathered per token

    def init_weights(self, init, std: float) -> None:
        init.zeros_(self.pre_bias)  # official code: pre_bias and new biases start at 0
        init.zeros_(self.compress_bias)


@register_slot
class HiddenSlot(_MixingSlot):
    """Ablation (spec 3, "direct hidden-state prediction"): a 2-layer MLP g predicts the teacher's
    normalised hidden state (D wide) instead of concept logits; g(h_t) is compressed to d by a dense
    linear map and de-normalised like the concept path. MLP width 4d is our choice (paper: unstated)."""

    name = "hidden"

    @dataclass
    class Options:
        hidden_dim: int = 0   # D, the teacher's width
        mix: str = "interleave"
        readout: str = "concept"

        def __post_init__(self):
            if self.hidden_dim <= 0:
                raise ValueError("the hidden-state target needs hidden_dim (the teacher's width) > 0")

    def __init__(self, config):
        super().__init__(config)
        d, D = config.n_embd, self.options.hidden_dim
        self.predictor = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, D))
        self.compress = nn.Linear(D, d)

    def predict(self, h, steering=None):
        if steering:
            raise ValueError("steering needs concept logits; this model regresses hidden states")
        u, mu, sigma = normalize_per_token(h)
        prediction = self.predictor(u - self.pre_bias)  # (B, T, D)
        concept = (self.compress(prediction) + self.pre_bias) * sigma + mu
        return concept.to(h.dtype), ConceptPrediction(prediction, None, None)

    def init_weights(self, init, std: float) -> None:
        init.zeros_(self.pre_bias)
