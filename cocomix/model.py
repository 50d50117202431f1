"""The one backbone every method trains: a compact GPT-2 as a Hugging Face model.

Architecture (spec §2): token + learned absolute position embeddings, pre-LN blocks
(LayerNorm -> causal self-attention -> residual; LayerNorm -> 4d MLP with tanh-GELU -> residual),
final LayerNorm, LM head tied to the token embedding, biases everywhere, GPT-2 init
N(0, init_std) with the residual output projections scaled by 1/sqrt(2 * n_layer).
Module names follow GPT-2 (`transformer.h.{i}.attn.c_attn`, ...) so weights map one-to-one,
but every projection is a plain `nn.Linear` (GPT-2's `Conv1D` stores weights transposed).

One optional *slot* acts on the residual stream after `insert_layer` blocks (`config.slot`):

  "none"     the plain backbone (NTP, KD).
  "concept"  CoCoMix (spec 1.3-1.5): predict concept logits z_t from h_t, keep the TopK raw logits,
             compress them to a continuous concept c_t (a gather of k rows, never a C-wide matmul),
             and interleave (h_1, c_1, ..., h_T, c_T) through the remaining blocks; the LM head reads
             the concept slots. Ablations (spec 3): add c_t to h_t instead (`concept_mix="add"`), or
             predict only (`"none"`); regress the teacher's hidden state (`concept_target="hidden"`).
  "pause"    pause tokens (spec 3): one learnable vector interleaved after every token; the LM head
             reads the pause slots.

To the outside the model stays an ordinary causal LM: `forward(input_ids)` returns one row of logits
per input token, and the KV cache holds T entries in the lower blocks and 2T in the interleaved upper
ones, so cached generation equals uncached. Losses other than NTP live in the method objects.

This file must stay self-contained (imports: stdlib, math, torch, transformers only): saved
checkpoints ship a copy of it so they load with `trust_remote_code=True` without this package.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class CocomixConfig(PreTrainedConfig):
    """Backbone hyper-parameters. transformers 5 turns config subclasses into keyword-only
    dataclasses, so fields are declared as annotated class attributes (like `GPT2Config`)."""

    model_type = "cocomix"
    # Standard HF names -> ours, so generation utilities, DynamicCache and lm-eval find them.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # one rate for embeddings, attention probabilities and residual branches
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    # Which training method built this model ("ntp", later "kd", "pause", "cocomix"). Methods
    # that add modules to this model also add their fields here, so a checkpoint rebuilds itself.
    method: str = "ntp"
    # ---- the slot after `insert_layer` blocks (module docstring; spec 1.3-1.5 and 3) ----
    slot: str = "none"               # "none" | "concept" | "pause"
    insert_layer: int = 0            # blocks before the slot (code: 3 at 69M, 5 at 386M / 1.38B)
    concept_mix: str = "interleave"  # concept slot: "interleave" (CoCoMix) | "add" (intervention) | "none"
    concept_target: str = "concepts"  # "concepts": z_t over the SAE dictionary; "hidden": teacher hidden state
    n_concepts: int = 0              # C, the SAE dictionary size (concept target)
    concept_k: int = 32              # TopK of z_t kept for compression
    concept_hidden_dim: int = 0      # hidden target: the teacher's width
    pause_readout: str = "pause"     # pause slot: the LM head reads the "pause" slots or the "token" slots

    def __post_init__(self, **kwargs):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.slot not in ("none", "concept", "pause"):
            raise ValueError(f"slot must be 'none', 'concept' or 'pause', got {self.slot!r}")
        if self.pause_readout not in ("pause", "token"):
            raise ValueError(f"pause_readout must be 'pause' or 'token', got {self.pause_readout!r}")
        if self.slot != "none" and not 0 < self.insert_layer < self.n_layer:
            raise ValueError(f"insert_layer={self.insert_layer} must be between 1 and n_layer-1={self.n_layer - 1}")
        if self.slot == "concept":
            if self.concept_mix not in ("interleave", "add", "none"):
                raise ValueError(f"concept_mix must be 'interleave', 'add' or 'none', got {self.concept_mix!r}")
            if self.concept_target == "concepts" and not 0 < self.concept_k <= self.n_concepts:
                raise ValueError(f"concept_k={self.concept_k} must be in [1, n_concepts={self.n_concepts}]")
            if self.concept_target == "hidden" and self.concept_hidden_dim <= 0:
                raise ValueError("concept_target='hidden' needs concept_hidden_dim (the teacher's width) > 0")
            if self.concept_target not in ("concepts", "hidden"):
                raise ValueError(f"concept_target must be 'concepts' or 'hidden', got {self.concept_target!r}")
        super().__post_init__(**kwargs)

    @property
    def interleaves(self) -> bool:
        """Whether the blocks after `insert_layer` see 2T positions (a slot after every token)."""
        return self.slot == "pause" or (self.slot == "concept" and self.concept_mix == "interleave")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CocomixConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # gets the 1/sqrt(2L) init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, past_key_values: Cache | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            # Appends this step's keys/values and returns the whole history: (B, n_head, past + T, head_dim)
            k, v = past_key_values.update(k, v, self.layer_idx)
        # attn_mask=None means "no padding": plain causal attention when queries and keys are the same
        # positions (training, prefill), no mask at all for a single new query over a cache.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T == k.shape[2],
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, head_dim) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: CocomixConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation of GELU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: CocomixConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, past_key_values=None):
        x = x + self.attn(self.ln_1(x), attn_mask, past_key_values)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---- the concept head (spec 1.3-1.4) ----------------------------------------------------------


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


class ConceptHead(nn.Module):
    """z_t = W_p (LN(h_t) - b_pre) + b_p; keep TopK_k(z_t) with raw values (no ReLU);
    c_t = (W_c TopK(z_t) + b_c + b_pre) * sigma_t + mu_t. This mirrors the SAE encoder/decoder as
    the official code does (spec 1.3-1.4); the paper's bare c_t = W TopK(z_t) + b is the same up to
    the normalisation. mu_t, sigma_t are the student's own per-token statistics."""

    def __init__(self, config: CocomixConfig):
        super().__init__()
        d, C = config.n_embd, config.n_concepts
        self.k = config.concept_k
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.predictor = nn.Linear(d, C)
        self.compress = nn.Embedding(C, d)  # (C, d): gathering k rows = using k columns of W (spec 1.7)
        self.compress_bias = nn.Parameter(torch.zeros(d))

    def forward(self, h, steering: dict[int, float] | None = None):
        u, mu, sigma = normalize_per_token(h)
        logits = self.predictor(u - self.pre_bias)  # (B, T, C)
        if steering:
            # The paper's steering (spec 4.7): scale chosen concept logits before TopK and compression.
            scale = torch.ones(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            scale[list(steering)] = torch.tensor(list(steering.values()), device=logits.device, dtype=logits.dtype)
            logits = logits * scale
        values, indices = logits.topk(self.k, dim=-1)  # (B, T, k) raw values, may be negative (code)
        concept = sparse_compress(values, indices, self.compress.weight) + self.compress_bias + self.pre_bias
        concept = concept * sigma + mu  # de-normalise with h_t's own statistics
        return concept.to(h.dtype), ConceptPrediction(logits, indices, values)


class HiddenHead(nn.Module):
    """Ablation (spec 3, "direct hidden-state prediction"): a 2-layer MLP g predicts the teacher's
    normalised hidden state (D wide) instead of concept logits; g(h_t) is compressed to d by a dense
    linear map and de-normalised like the concept path. MLP width 4d is our choice (paper: unstated)."""

    def __init__(self, config: CocomixConfig):
        super().__init__()
        d, D = config.n_embd, config.concept_hidden_dim
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.predictor = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, D))
        self.compress = nn.Linear(D, d)

    def forward(self, h, steering=None):
        if steering:
            raise ValueError("steering needs concept logits; this model regresses hidden states")
        u, mu, sigma = normalize_per_token(h)
        prediction = self.predictor(u - self.pre_bias)  # (B, T, D)
        concept = (self.compress(prediction) + self.pre_bias) * sigma + mu
        return concept.to(h.dtype), ConceptPrediction(prediction, None, None)


class PauseSlot(nn.Module):
    """Pause tokens (spec 3): one learnable vector shared by every position."""

    def __init__(self, config: CocomixConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, h, steering=None):
        return self.embedding.to(h.dtype).expand_as(h), None


def interleave(h, slot):
    """(h_1..h_T), (s_1..s_T) -> (h_1, s_1, ..., h_T, s_T): each slot right after its token (spec 1.5).
    (B, T, d) x2 -> (B, 2T, d)"""
    B, T, d = h.shape
    return torch.stack([h, slot], dim=2).view(B, 2 * T, d)


def build_attention_mask(padding_mask, query_len: int, past_len: int, device):
    """Boolean SDPA mask (True = may attend), or None when SDPA's own causal path suffices.

    padding_mask: optional (B, past_len + query_len) with 1 for real tokens, 0 for padding (HF
    convention, covers the cached tokens too). Returns None, (1, 1, T, S) or (B, 1, T, S), S = past + T.
    """
    key_len = past_len + query_len
    if padding_mask is not None and padding_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2-D (batch, length) padding mask; 4-D masks are built here")
    if padding_mask is not None and padding_mask.shape[-1] != key_len:
        raise ValueError(f"attention_mask has length {padding_mask.shape[-1]}, expected past + new = {key_len}")
    no_padding = padding_mask is None or bool(padding_mask.all())
    if no_padding and (query_len == key_len or query_len == 1):
        return None  # is_causal (T == S) or a single query that may see every cached key

    query_pos = torch.arange(past_len, key_len, device=device)  # absolute position of each query
    key_pos = torch.arange(key_len, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, T, S) causal, offset by the cache
    if not no_padding:
        mask = mask & padding_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        # With left padding a query on a pad slot sees no key at all, and softmax over nothing is NaN.
        # Letting every query see itself fixes that and changes nothing for real tokens (they already do).
        mask = mask | (key_pos[None, :] == query_pos[:, None])
    return mask


# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` in model inputs (generate() passes
# `cache=`) and outputs (`past_key_values` stays readable, with a deprecation warning). The forward
# accepts both names and fills whichever field this version's output class has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class CocomixCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the concept head's prediction (slot="concept"), for the concept
    loss and interpretability. hidden_states of interleaved blocks have 2T positions."""

    concept_logits: torch.Tensor | None = None   # (B, T, C) z_t; hidden target: (B, T, D)
    concept_indices: torch.Tensor | None = None  # (B, T, k) TopK concepts mixed into the stream
    concept_values: torch.Tensor | None = None   # (B, T, k) their raw logits


class CocomixForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CocomixConfig
    # Plain-attribute layout (no separate base model), so the HF "base model" is the model itself.
    base_model_prefix = ""
    _no_split_modules = ["Block"]
    # transformers 5 ties these after init and on load; the checkpoint stores only the embedding.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CocomixConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # With the same seed the backbone gets the same initial weights whatever the slot (a concept or
        # pause model starts from exactly the NTP model's weights): the slot is registered after the
        # backbone (post_init initialises in registration order) and built on a forked RNG, so the
        # throw-away default init of its nn.Linear does not advance the global generator.
        with torch.random.fork_rng(devices=[]):
            if config.slot == "concept":
                self.concept_head = ConceptHead(config) if config.concept_target == "concepts" else HiddenHead(config)
            elif config.slot == "pause":
                self.pause = PauseSlot(config)
        self.concept_steering: dict[int, float] | None = None  # set by `steer_concepts`, read by forward
        self.post_init()  # runs _init_weights on every module, then ties lm_head to wte

    @torch.no_grad()
    def _init_weights(self, module):
        # GPT-2 / nanoGPT init. The `init` helpers from transformers skip tensors already loaded from a
        # checkpoint; plain torch.nn.init would overwrite them when from_pretrained calls this.
        from transformers import initialization as init

        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # Two residual additions per block: scale so the residual stream's variance doesn't grow with depth.
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (ConceptHead, HiddenHead)):
            init.zeros_(module.pre_bias)  # official code: pre_bias and new biases start at 0
            if isinstance(module, ConceptHead):
                init.zeros_(module.compress_bias)
        elif isinstance(module, PauseSlot):
            init.normal_(module.embedding, mean=0.0, std=std)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,          # (B, T) token ids
        attention_mask=None,     # (B, past + T), 1 = token, 0 = padding
        position_ids=None,       # (B, T) or (1, T); generate() derives them from attention_mask
        past_key_values=None,    # transformers Cache (DynamicCache) or None; transformers >= 5.24 names it `cache`
        inputs_embeds=None,      # (B, T, d) instead of input_ids
        labels=None,             # (B, T); shifted inside, -100 ignored (HF convention)
        use_cache=None,
        return_dict=True,
        output_hidden_states=None,
        concept_steering=None,   # {concept index: factor}; default: the `steer_concepts` context
        cache=None,              # the same Cache under its transformers >= 5.24 name (what generate() passes)
        **kwargs,
    ) -> CocomixCausalLMOutput:
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device

        # A cache only pays off at inference; training never reuses one.
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + T > self.config.n_positions:
            raise ValueError(f"sequence length {past_len + T} exceeds n_positions={self.config.n_positions}")

        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=device)[None]  # (1, T)
        attn_mask = build_attention_mask(attention_mask, T, past_len, device)

        x = self.transformer.drop(inputs_embeds + self.transformer.wpe(position_ids))  # (B, T, d)
        cfg = self.config
        prediction = None
        # hidden_states follow GPT-2's convention: the input to each block, then ln_f of the last output.
        all_hidden_states = () if output_hidden_states else None
        for i, block in enumerate(self.transformer.h):
            if cfg.slot != "none" and i == cfg.insert_layer:
                slot_module = self.concept_head if cfg.slot == "concept" else self.pause
                slot, prediction = slot_module(x, concept_steering if concept_steering is not None
                                               else self.concept_steering)
                if cfg.interleaves:
                    x = interleave(x, slot)  # (B, 2T, d)
                    # Upper blocks attend causally over the interleaved sequence; a padded token's slot is
                    # padding too, and the cache there holds 2 * past entries.
                    padding = attention_mask.repeat_interleave(2, dim=1) if attention_mask is not None else None
                    attn_mask = build_attention_mask(padding, 2 * T, 2 * past_len, device)
                elif cfg.concept_mix == "add":
                    x = x + slot  # the intervention ablation: h_t <- h_t + c_t
                # concept_mix == "none": prediction only, the stream is unchanged
            if output_hidden_states:
                all_hidden_states += (x,)
            x = block(x, attn_mask, cache if use_cache else None)
        if cfg.interleaves:
            # (B, 2T, d) -> (B, T, d): the slot after token t predicts token t+1 (spec 1.5), or, for pause
            # models with pause_readout="token", token t's own slot does.
            x = x[:, 0::2] if cfg.slot == "pause" and cfg.pause_readout == "token" else x[:, 1::2]
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            all_hidden_states += (x,)
        logits = self.lm_head(x)  # (B, T, vocab)

        loss = None
        if labels is not None:
            # Position t predicts token t+1; fp32 for a stable log-softmax under bf16 autocast.
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),  # (B*(T-1), vocab)
                labels[:, 1:].reshape(-1).to(device),                 # (B*(T-1),)
                ignore_index=-100,
            )

        output = CocomixCausalLMOutput(
            loss=loss,
            logits=logits,
            **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=all_hidden_states,
            concept_logits=prediction.logits if prediction is not None else None,
            concept_indices=prediction.indices if prediction is not None else None,
            concept_values=prediction.values if prediction is not None else None,
        )
        return output if return_dict else output.to_tuple()

    # ---- interpretability -----------------------------------------------------------------

    def predict_concepts(self, input_ids, concept_steering=None) -> ConceptPrediction:
        """The concept head's prediction per position, running only the first `insert_layer` blocks."""
        if self.config.slot != "concept":
            raise ValueError(f"predict_concepts needs a concept model, this one has slot={self.config.slot!r}")
        T = input_ids.shape[1]
        x = self.transformer.drop(self.transformer.wte(input_ids)
                                  + self.transformer.wpe(torch.arange(T, device=input_ids.device))[None])
        for block in self.transformer.h[: self.config.insert_layer]:
            x = block(x)
        steering = concept_steering if concept_steering is not None else self.concept_steering
        return self.concept_head(x, steering)[1]

    @contextmanager
    def steer_concepts(self, factors: dict[int, float]):
        """Within the block, every forward (generate() included) multiplies the predicted logit of each
        concept index by its factor before TopK and compression, at every position (spec 4.7)."""
        if self.config.slot != "concept" or self.config.concept_target != "concepts":
            raise ValueError("steering needs a concept model that predicts SAE concepts")
        bad = [i for i in factors if not 0 <= i < self.config.n_concepts]
        if bad:
            raise ValueError(f"concept indices {bad} are outside [0, n_concepts={self.config.n_concepts})")
        previous, self.concept_steering = self.concept_steering, dict(factors)
        try:
            yield self
        finally:
            self.concept_steering = previous

    # ---- helpers for the trainer -------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied LM head counts once). non_embedding drops wte and wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates tied tensors
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context length seq_len.

        PaLM (App. B) / nanoGPT convention:
          6 * N                          every weight does a multiply-add (2 FLOPs) forward and twice
                                         that backward; N = non-embedding params (blocks + ln_f, biases and
                                         LayerNorms included) + vocab * d for the LM-head matmul, counted
                                         once although its weight is shared with wte. Embedding lookups and
                                         position embeddings are gathers: 0 FLOPs.
          + 12 * n_layer * n_embd * T    attention scores q.k and the weighted sum of v: 2 * 2 * T * d
                                         forward per layer, x3 with backward; full T x T, i.e. the causal
                                         mask's halving is not credited.
        Softmax, LayerNorm, GELU and the loss are not counted.

        With a slot after `insert_layer` blocks: interleaving doubles the positions of the upper blocks,
        so each token pays their weights twice and their attention four times (2 queries over 2T keys).
        The concept head counts its dense predictor (d*C + C) and, for compression, only the k gathered
        rows (k*d) plus its bias; the pause vector is a broadcast (0 FLOPs). The LM head reads T slots.
        """
        cfg = self.config
        d, T = cfg.n_embd, seq_len
        per_block = [sum(p.numel() for p in block.parameters()) for block in self.transformer.h]
        split = cfg.insert_layer if cfg.slot != "none" else cfg.n_layer
        streams = 2 if cfg.interleaves else 1  # positions per token in blocks split..L-1
        n = (sum(per_block[:split]) + streams * sum(per_block[split:])
             + sum(p.numel() for p in self.transformer.ln_f.parameters()) + cfg.vocab_size * d)
        if cfg.slot == "concept":
            head = self.concept_head
            n += sum(p.numel() for p in head.predictor.parameters()) + head.pre_bias.numel()
            if cfg.concept_target == "concepts":
                n += cfg.concept_k * d + head.compress_bias.numel()
            else:
                n += sum(p.numel() for p in head.compress.parameters())
        attention = 12 * d * T * (split + streams**2 * (cfg.n_layer - split))
        return 6 * n + attention

    @classmethod
    def from_gpt2(cls, gpt2_model) -> "CocomixForCausalLM":
        """Copy a `transformers.GPT2LMHeadModel` (e.g. GPT-2 124M, the teacher) into this class."""
        g = gpt2_model.config
        n_inner = g.n_inner if g.n_inner is not None else 4 * g.n_embd
        if (n_inner != 4 * g.n_embd or g.activation_function != "gelu_new" or not g.scale_attn_weights
                or g.scale_attn_by_inverse_layer_idx or g.add_cross_attention):
            raise ValueError("from_gpt2 supports only the standard GPT-2 block (4d gelu_new MLP, 1/sqrt(d_head) attention)")
        config = CocomixConfig(
            vocab_size=g.vocab_size, n_positions=g.n_positions, n_embd=g.n_embd, n_layer=g.n_layer, n_head=g.n_head,
            dropout=g.resid_pdrop,  # one rate for all; GPT-2 ships 0.1 for resid, embd and attn alike
            init_std=g.initializer_range, layer_norm_eps=g.layer_norm_epsilon,
            bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id,
            tie_word_embeddings=True,
        )
        model = cls(config).to(gpt2_model.dtype)
        source = gpt2_model.state_dict()
        converted = {}
        for name in model.state_dict():
            tensor = source[name]
            # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in).
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                tensor = tensor.t()
            converted[name] = tensor
        model.load_state_dict(converted, strict=True)
        return model


# Saving copies this file next to the weights and writes `auto_map` into config.json, so a checkpoint
# loads with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and no `cocomix` package.
CocomixConfig.register_for_auto_class()
CocomixForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register_auto_classes() -> None:
    """Make model_type "cocomix" known to the Auto classes in this process (called by `import cocomix`).

    An `auto_map` in config.json does not force trust_remote_code once this ran: transformers 5.23
    resolves trust_remote_code=None to False when the model type is registered locally, and even with
    trust_remote_code=True a class registered from outside the `transformers` package wins over the
    copied file (`explicit_local_code` in auto_factory.py / configuration_auto.py).
    """
    AutoConfig.register("cocomix", CocomixConfig, exist_ok=True)
    AutoModelForCausalLM.register(CocomixConfig, CocomixForCausalLM, exist_ok=True)
