"""The one backbone every method trains: a compact GPT-2 as a Hugging Face model.

Architecture (spec §2): token + learned absolute position embeddings, pre-LN blocks
(LayerNorm -> causal self-attention -> residual; LayerNorm -> 4d MLP with tanh-GELU -> residual),
final LayerNorm, LM head tied to the token embedding, biases everywhere, GPT-2 init
N(0, init_std) with the residual output projections scaled by 1/sqrt(2 * n_layer).
Module names follow GPT-2 (`transformer.h.{i}.attn.c_attn`, ...) so weights map one-to-one,
but every projection is a plain `nn.Linear` (GPT-2's `Conv1D` stores weights transposed).

One optional *slot* module acts on the residual stream after `insert_layer` blocks: the model side of
the methods that change the backbone (pause tokens, CoCoMix's concept head and its ablations). It
lives in `cocomix/slots.py` behind a small interface (what it interleaves or adds, which stream the
LM head reads, its FLOPs); `config.slot` names it and `config.slot_options` holds its fields. The
backbone calls it and never branches on a method's name.

The embedding / LM-head vocabulary may be padded past the tokenizer's (`vocab_size` rows, of which the
first `real_vocab_size` are tokens; `padded_vocab_size` rounds up to a multiple of 64 by default, so the
LM-head matmul, ~40% of a 69M model's FLOPs, has a GPU-friendly size). The padding rows are never
looked up and their logits are -inf, so softmax, cross-entropy, perplexity, lm-eval scores and
generate() are those of the unpadded model and no padding id is ever predicted.

To the outside the model stays an ordinary causal LM: `forward(input_ids)` returns one row of logits
per input token, and the KV cache holds T entries in the lower blocks and 2T in the interleaved upper
ones, so cached generation equals uncached. Losses other than NTP live in the method objects.

Attention follows transformers' conventions: `attn_implementation="sdpa"` (the default,
`F.scaled_dot_product_attention`) or `"eager"` (explicit softmax(q k^T / sqrt(d_head)), which can
return the maps), chosen at load (`from_pretrained(..., attn_implementation=...)`) or later
(`set_attn_implementation`). `output_attentions=True` returns one (B, n_head, T, S) map per block
(2T x 2T in interleaved blocks); under SDPA those forwards fall back to the eager path, as
transformers' own models do. Blocks are `GradientCheckpointingLayer`s, so
`gradient_checkpointing_enable()` recomputes each block's activations in the backward pass.

This file and `slots.py` must stay self-contained (imports: stdlib, math, torch, transformers, and
`.slots` relatively): saved checkpoints ship a copy of both, so they load with
`trust_remote_code=True` without this package.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .slots import SLOTS, ConceptPrediction, Slot

logger = logging.get_logger(__name__)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (1: unchanged), e.g. GPT-2's 50257 -> 50304."""
    if vocab_size <= 0 or multiple <= 0:
        raise ValueError(f"vocab_size={vocab_size} and multiple={multiple} must be positive")
    return -(-vocab_size // multiple) * multiple


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

    vocab_size: int = 50257          # rows of the token embedding and the LM head (padding included)
    real_vocab_size: int | None = None  # the tokenizer's: ids >= it are padding (-inf logits); None: vocab_size
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
    # Which training method built this model (a tag: the architecture is `slot` + `slot_options`).
    method: str = "ntp"
    # ---- the slot module after `insert_layer` blocks (cocomix/slots.py; spec 1.3-1.5 and 3) ----
    slot: str | None = None          # a name in slots.SLOTS ("pause", "concept", "hidden"), None: plain backbone
    insert_layer: int = 0            # blocks before the slot (code: 3 at 69M, 5 at 386M / 1.38B)
    slot_options: dict | None = None  # the slot's own fields (its `Options` dataclass)

    def __post_init__(self, **kwargs):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.real_vocab_size is None:  # checkpoints from before padding: every row is a token
            self.real_vocab_size = self.vocab_size
        if not 0 < self.real_vocab_size <= self.vocab_size:
            raise ValueError(f"real_vocab_size={self.real_vocab_size} must be in 1..vocab_size={self.vocab_size}")
        if self.slot == "none":  # older spelling of "no slot"
            self.slot = None
        if self.slot is not None:
            if self.slot not in SLOTS:
                raise ValueError(f"slot must be None or one of {sorted(SLOTS)}, got {self.slot!r}")
            if not 0 < self.insert_layer < self.n_layer:
                raise ValueError(f"insert_layer={self.insert_layer} must be between 1 and n_layer-1={self.n_layer - 1}")
            try:
                SLOTS[self.slot].Options(**(self.slot_options or {}))  # the slot checks its own fields
            except TypeError as e:
                raise ValueError(f"slot {self.slot!r}: bad slot_options {self.slot_options!r} ({e})") from None
        super().__post_init__(**kwargs)


def eager_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """Attention written out (transformers' AttentionInterface signature): softmax(q k^T * scaling) v.

    query (B, H, T, hd), key and value (B, H, S, hd). attention_mask: boolean, True = may attend,
    broadcastable to (B, H, T, S) (what `build_attention_mask` builds), or None as for SDPA: causal
    when T > 1 (query t sits at absolute position S - T + t), no mask for one query over a cache.
    Returns the output (B, T, H, hd) and the attention probabilities (B, H, T, S), whose rows sum to 1.
    """
    T, S = query.shape[2], key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, S)
    if attention_mask is None and T > 1:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class CausalSelfAttention(nn.Module):
    is_causal = True  # read by transformers' sdpa_attention_forward when no mask is given

    def __init__(self, config: CocomixConfig, layer_idx: int):
        super().__init__()
        self.config = config  # shared with the model: `set_attn_implementation` reaches every layer
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # gets the 1/sqrt(2L) init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache: Cache | None = None, output_attentions: bool = False):
        """(B, T, C) -> (B, T, C) and the attention probabilities (B, n_head, T, S), or None unless asked."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # Appends this step's keys/values and returns the whole history: (B, n_head, past + T, head_dim)
            k, v = cache.update(k, v, self.layer_idx)
        implementation = self.config._attn_implementation or "sdpa"
        if output_attentions and implementation != "eager":
            logger.warning_once(f"attn_implementation={implementation!r} cannot return attention maps: forwards with "
                                "output_attentions=True use the eager path (load with attn_implementation='eager' "
                                "to make it the default)")
            implementation = "eager"
        attention = (eager_attention_forward if implementation == "eager"
                     else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward))
        # attn_mask=None means "no padding": plain causal attention when queries and keys are the same
        # positions (training, prefill), no mask at all for a single new query over a cache.
        y, weights = attention(self, q, k, v, attn_mask, dropout=self.dropout if self.training else 0.0,
                               scaling=None, is_causal=attn_mask is None and T == k.shape[2])
        y = y.reshape(B, T, C)  # (B, T, n_head, head_dim) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (weights if output_attentions else None)


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


class Block(GradientCheckpointingLayer):
    """One pre-LN block. Returns the new residual stream (B, T, d), or (stream, attention maps) when
    output_attentions is asked. Under gradient checkpointing (training with gradients only) its
    activations are recomputed in the backward pass; the KV cache (`cache=`) is then not used."""

    def __init__(self, config: CocomixConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, output_attentions: bool = False):
        a, weights = self.attn(self.ln_1(x), attn_mask, cache, output_attentions)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return (x, weights) if output_attentions else x


def token_nll(logits, targets, ignore_index: int = -100):
    """Per-position next-token cross-entropy, shape (B, T-1), in at least fp32 (a stable log-softmax
    under bf16 autocast; fp64 stays fp64): position t predicts targets[:, t+1]. Targets equal to
    `ignore_index` get 0. The one NLL of the harness: training loss, held-out loss, perplexity."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),               # (B*(T-1), V)
        targets[:, 1:].reshape(-1).to(logits.device),      # (B*(T-1),)
        ignore_index=ignore_index, reduction="none",
    ).view(targets.size(0), -1)


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
    concept_norm_ratio: torch.Tensor | None = None  # () mean ||c_t - mu_t|| / ||h_t - mu_t|| (concept slot)


class CocomixForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CocomixConfig
    # Plain-attribute layout (no separate base model), so the HF "base model" is the model itself.
    base_model_prefix = ""
    _no_split_modules = ["Block"]
    _supports_sdpa = True  # attn_implementation "sdpa" (default) or "eager" (see CausalSelfAttention)
    supports_gradient_checkpointing = True  # the blocks are GradientCheckpointingLayers
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
            self.slot: Slot | None = SLOTS[config.slot](config) if config.slot is not None else None
        self.concept_steering: dict[int, float] | None = None  # set by `steer_concepts`, read by forward
        self.post_init()  # runs _init_weights on every module, then ties lm_head to wte

    @torch.no_grad()
    def _init_weights(self, module):
        # GPT-2 / nanoGPT init. The `init` helpers from transformers skip tensors already loaded from a
        # checkpoint; plain torch.nn.init would overwrite them when from_pretrained calls this.
        from transformers import initialization as init

        std = self.config.init_std * getattr(module, "init_std_scale", 1.0)  # a slot may scale its own
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
        elif isinstance(module, Slot):
            module.init_weights(init, std)  # after its Linear/Embedding children (post-order)

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
        output_attentions=None,  # one (B, n_head, T, S) map per block; SDPA falls back to eager for these
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

        x = self.transformer.drop(inputs_embeds + self.transformer.wpe(position_ids))  # (B, T, d)
        steering = concept_steering if concept_steering is not None else self.concept_steering
        if output_attentions is None:
            output_attentions = bool(self.config.output_attentions)
        x, prediction, all_hidden_states, all_attentions = self._run_blocks(
            x, attention_mask, cache if use_cache else None, past_len, steering, output_hidden_states,
            output_attentions)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.real_vocab_size < self.config.vocab_size:
            # Padding ids get probability exactly 0. In place on the matmul's output (its backward does not
            # need it), so no second (B, T, V) tensor; their gradient is 0, as for any constant.
            logits[..., self.config.real_vocab_size:] = float("-inf")

        loss = None
        if labels is not None:
            nll = token_nll(logits, labels)  # (B, T-1): position t predicts token t+1, in fp32
            loss = nll.sum() / (labels[:, 1:] != -100).sum().clamp(min=1)

        output = CocomixCausalLMOutput(
            loss=loss,
            logits=logits,
            **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            concept_logits=prediction.logits if prediction is not None else None,
            concept_indices=prediction.indices if prediction is not None else None,
            concept_values=prediction.values if prediction is not None else None,
            concept_norm_ratio=prediction.norm_ratio if prediction is not None else None,
        )
        return output if return_dict else output.to_tuple()

    def _run_blocks(self, x, attention_mask, cache, past_len: int, steering, output_hidden_states,
                    output_attentions: bool = False):
        """The blocks, the slot module after `insert_layer` of them, its read-out and ln_f.
        (B, T, d) -> (B, T, d), the slot's prediction (or None), the hidden states (or None), the
        attention maps (or None)."""
        T, device = x.shape[1], x.device
        attn_mask = build_attention_mask(attention_mask, T, past_len, device)
        prediction = None
        # hidden_states follow GPT-2's convention: the input to each block, then ln_f of the last output.
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, block in enumerate(self.transformer.h):
            if self.slot is not None and i == self.config.insert_layer:
                x, prediction = self.slot(x, steering)  # (B, streams * T, d)
                if self.slot.streams > 1:
                    # Upper blocks attend causally over the interleaved sequence; a padded token's slots are
                    # padding too, and the cache there holds streams * past entries.
                    n = self.slot.streams
                    padding = attention_mask.repeat_interleave(n, dim=1) if attention_mask is not None else None
                    attn_mask = build_attention_mask(padding, n * T, n * past_len, device)
            if output_hidden_states:
                all_hidden_states += (x,)
            # The stream positionally (gradient checkpointing passes positional arguments through), the
            # cache by name (a checkpointed block drops it: its backward replay must not append twice).
            x = block(x, attn_mask, cache=cache, output_attentions=output_attentions)
            if output_attentions:
                x, weights = x
                all_attentions += (weights,)
        if self.slot is not None:
            x = self.slot.readout(x)  # (B, streams * T, d) -> (B, T, d)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            all_hidden_states += (x,)
        return x, prediction, all_hidden_states, all_attentions

    # ---- interpretability -----------------------------------------------------------------

    def predict_concepts(self, input_ids, concept_steering=None) -> ConceptPrediction:
        """The concept head's prediction per position, running only the first `insert_layer` blocks."""
        if not hasattr(self.slot, "predict"):
            raise ValueError(f"predict_concepts needs a concept model, this one has slot={self.config.slot!r}")
        T = input_ids.shape[1]
        x = self.transformer.drop(self.transformer.wte(input_ids)
                                  + self.transformer.wpe(torch.arange(T, device=input_ids.device))[None])
        for block in self.transformer.h[: self.config.insert_layer]:
            x = block(x)
        steering = concept_steering if concept_steering is not None else self.concept_steering
        return self.slot.predict(x, steering)[1]

    @contextmanager
    def steer_concepts(self, factors: dict[int, float]):
        """Within the block, every forward (generate() included) multiplies the predicted logit of each
        concept index by its factor before TopK and compression, at every position (spec 4.7)."""
        if self.config.slot != "concept":
            raise ValueError("steering needs a concept model that predicts SAE concepts")
        bad = [i for i in factors if not 0 <= i < self.slot.n_concepts]
        if bad:
            raise ValueError(f"concept indices {bad} are outside [0, n_concepts={self.slot.n_concepts})")
        previous, self.concept_steering = self.concept_steering, dict(factors)
        try:
            yield self
        finally:
            self.concept_steering = previous

    # ---- helpers for the trainer -------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied LM head counts once). non_embedding drops wte and wpe. Padding rows of
        the vocabulary count: they are stored, and the LM-head matmul multiplies through them."""
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
                                         once although its weight is shared with wte; vocab is the padded
                                         `vocab_size`, as the matmul really runs over the padding rows
                                         (their -inf logits are computed, then overwritten). Embedding
                                         lookups and position embeddings are gathers: 0 FLOPs.
          + 12 * n_layer * n_embd * T    attention scores q.k and the weighted sum of v: 2 * 2 * T * d
                                         forward per layer, x3 with backward; full T x T, i.e. the causal
                                         mask's halving is not credited.
        Softmax, LayerNorm, GELU and the loss are not counted.

        With a slot after `insert_layer` blocks: each token pays the upper blocks' weights `streams` times
        and their attention streams^2 times (streams queries over streams * T keys; 2 when interleaved),
        plus the weights the slot itself multiplies through (`Slot.flops_params`: the concept head's
        dense predictor and only the k gathered compression rows; 0 for the pause broadcast). The LM head
        reads T positions.
        """
        cfg = self.config
        d, T = cfg.n_embd, seq_len
        per_block = [sum(p.numel() for p in block.parameters()) for block in self.transformer.h]
        split = cfg.insert_layer if self.slot is not None else cfg.n_layer
        streams = self.slot.streams if self.slot is not None else 1  # positions per token in blocks split..L-1
        n = (sum(per_block[:split]) + streams * sum(per_block[split:])
             + sum(p.numel() for p in self.transformer.ln_f.parameters()) + cfg.vocab_size * d)
        if self.slot is not None:
            n += self.slot.flops_params()
        attention = 12 * d * T * (split + streams**2 * (cfg.n_layer - split))
        return 6 * n + attention

    @classmethod
    def from_gpt2(cls, gpt2_model, vocab_multiple: int = 1) -> "CocomixForCausalLM":
        """Copy a `transformers.GPT2LMHeadModel` (e.g. GPT-2 124M, the teacher) into this class. With
        vocab_multiple > 1 the vocabulary is padded (zero rows, -inf logits): same distributions, faster head."""
        g = gpt2_model.config
        n_inner = g.n_inner if g.n_inner is not None else 4 * g.n_embd
        if (n_inner != 4 * g.n_embd or g.activation_function != "gelu_new" or not g.scale_attn_weights
                or g.scale_attn_by_inverse_layer_idx or g.add_cross_attention):
            raise ValueError("from_gpt2 supports only the standard GPT-2 block (4d gelu_new MLP, 1/sqrt(d_head) attention)")
        config = CocomixConfig(
            vocab_size=padded_vocab_size(g.vocab_size, vocab_multiple), real_vocab_size=g.vocab_size,
            n_positions=g.n_positions, n_embd=g.n_embd, n_layer=g.n_layer, n_head=g.n_head,
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
            if name in ("transformer.wte.weight", "lm_head.weight"):  # tied; padding rows are zero
                tensor = torch.cat([tensor, tensor.new_zeros(config.vocab_size - g.vocab_size, g.n_embd)])
            converted[name] = tensor
        model.load_state_dict(converted, strict=True)
        return model


# Saving copies this file next to the weights and writes `auto_map` into config.json, so a checkpoint
# loads with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and no `cocomix` package.
CocomixConfig.register_for_auto_class()
CocomixForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register_auto_classes() -> None:
    """Make model_type "cocomix" known to the Auto classes in this process (on import of this module,
    which `import cocomix` triggers as soon as transformers is imported).

    An `auto_map` in config.json does not force trust_remote_code once this ran: transformers 5.23
    resolves trust_remote_code=None to False when the model type is registered locally, and even with
    trust_remote_code=True a class registered from outside the `transformers` package wins over the
    copied file (`explicit_local_code` in auto_factory.py / configuration_auto.py).
    """
    AutoConfig.register("cocomix", CocomixConfig, exist_ok=True)
    AutoModelForCausalLM.register(CocomixConfig, CocomixForCausalLM, exist_ok=True)


if __name__ == "cocomix.model":  # the package's copy, not one loaded as a checkpoint's remote code
    register_auto_classes()
