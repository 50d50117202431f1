"""Typed experiment configuration: YAML in, validated dataclasses out.

A config file is a nested mapping whose sections mirror the dataclasses below. Two optional
tables of *dotted overrides* make one file describe a whole grid:

    scale: 69M                      # which entry of `scales` to apply
    scales:
      69M: {model.n_embd: 624, model.n_layer: 8, train.lr: 6.0e-4}

Resolution order: file values, then the selected scale's overrides, then command-line
overrides (`model.n_embd=128`). The result is validated once; nothing mutates it afterwards
(run state lives in checkpoints, not in the config).

Every field carries an attribute docstring (the string right after it): its meaning, unit and
where the default comes from. `describe_config(cfg)` (`cocomix config`) prints a resolved config
as YAML with those docstrings as comments.

Each section checks itself beside its fields (`Section.check`); `validate` runs them all. Every
error is a `ConfigError` whose message is a single line naming the offending key. Method names are
not checked here: the method registry (`cocomix.methods`) owns that list, and the CLI asks it.

This module imports neither torch nor transformers, so a bad config fails in well under a second.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cocomix.files import atomic_write_text, sha256_json


class ConfigError(ValueError):
    """A config problem; the message is one line that names the key."""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


class Section:
    """Base of the config sections. `check` holds the checks that types alone cannot express."""

    def check(self, cfg: Config) -> None:
        """Raise a `ConfigError` naming the key if this section is inconsistent (in itself or with
        the rest of `cfg`, the whole config). Nothing to check by default."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig(Section):
    """The embedded concept-driven language (see `cocomix.data.synthetic`)."""

    n_tokens: int = 3_000_000
    """Approximate number of words to generate (train + val)."""
    n_topics: int = 12
    """Number of latent topics; each owns its own content words."""
    words_per_topic: int = 40
    """Content words per topic: per part of speech, or in all if `parts_of_speech` is false."""
    parts_of_speech: bool = True
    """Each topic's words split into nouns, verbs and adjectives (`words_per_topic` each); false: one
    pool per topic fills every content slot, so a topic is one word class (what the default uses)."""
    max_topics_per_doc: Literal[1, 2] = 2
    """2: a document mixes one or two topics sentence by sentence (70/30); 1: one topic per document."""
    n_professions: int = 8
    """Entity attributes: each entity introduced in a document has one profession."""
    seed: int = 1234
    """Seed of the generator: the same seed and sizes give the same corpus, word for word."""


@dataclass
class DataConfig(Section):
    """Where the corpus comes from and where tokenised shards go."""

    source: Literal["synthetic", "text", "hf"] = "synthetic"
    """synthetic: the embedded language (`synthetic`, no download); text: local files (`paths`);
    hf: a `datasets` dataset (`hf_path`; the paper trains on OpenWebText, spec section 2)."""
    paths: list[str] = field(default_factory=list)
    """`text` source: .txt/.jsonl/.parquet files or folders of them."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet/hf rows."""
    strip_gutenberg: bool = False
    """Strip Project Gutenberg licence headers and footers (`text` source)."""
    encoding: str = "utf-8"
    """`text` source: the encoding of the .txt/.jsonl files, decoded strictly; an ASCII-compatible
    codec (utf-8, cp1252, latin-1, ...). A UTF-8 byte-order mark is dropped."""
    max_bad_files: int = 0
    """`text` source: how many files that are not text (bytes invalid in `encoding`, or NUL bytes:
    a binary file) are skipped, each reported in the manifest's `skipped_files` and a warning; one
    more is an error naming the first. 0: any such file is an error."""
    hf_path: str | None = None
    """`hf` source: a dataset name or local path for `datasets.load_dataset`."""
    hf_name: str | None = None
    """`hf` source: the dataset's configuration name (`name=` of `datasets.load_dataset`); null: none."""
    hf_split: str = "train"
    """`hf` source: the split that is loaded and then cut into our train/val (OpenWebText has only train)."""
    hf_data_files: list[str] = field(default_factory=list)
    """`hf` source: `data_files=` of `datasets.load_dataset` (e.g. Parquet shards with hf_path `parquet`, or
    files of a Hub dataset); empty: the dataset's own."""
    hf_revision: str | None = None
    """`hf` source: the Hub revision (a branch, tag or commit, e.g. refs/convert/parquet); null: main."""
    hf_streaming: bool = False
    """`hf` source: stream the dataset instead of downloading and caching it whole. The train/val split is
    then a seeded draw per document (`val_fraction`, `split_seed`, as for the text source) instead of
    `train_test_split`, which needs the whole dataset."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (OpenWebText recipe: 0.0005)."""
    split_seed: int = 2357
    """Seed of the document-level train/val split (the official code's OpenWebText recipe,
    `train_test_split(test_size=0.0005, seed=2357)`, spec section 2)."""
    max_docs: int | None = None
    """Use only the first N documents (smoke runs)."""
    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""
    dir: str | None = None
    """Output folder; default `<results_dir>/<experiment>/data`."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Sizes and seed of the `synthetic` source (ignored by the others)."""

    def check(self, cfg: Config) -> None:
        _need(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        _need(self.shard_tokens > 0, "data.shard_tokens", "must be positive")
        _need(self.max_bad_files >= 0, "data.max_bad_files", "must be >= 0")
        try:
            ascii_ok = codecs.decode(b"\n ~", self.encoding) == "\n ~"  # b"\n" ends a .jsonl line
        except LookupError:
            ascii_ok = None
        except Exception:  # not a text codec (base64, rot13, ...)
            ascii_ok = False
        _need(ascii_ok is not None, "data.encoding", f"unknown encoding {self.encoding!r} (e.g. utf-8, cp1252, latin-1)")
        _need(bool(ascii_ok), "data.encoding", f"{self.encoding!r} is not ASCII-compatible (e.g. utf-8, cp1252, latin-1)")
        if self.source == "text":
            _need(bool(self.paths), "data.paths", "the text source needs at least one file or folder")
        if self.source == "hf":
            _need(bool(self.hf_path), "data.hf_path", "the hf source needs a dataset name or local path")


@dataclass
class TokenizerConfig(Section):
    """Train a byte-level BPE on the corpus, or load an existing tokenizer folder."""

    path: str | None = None
    """Existing tokenizer folder (e.g. GPT-2's); when set nothing is trained."""
    vocab_size: int = 2048
    """Vocabulary of the trained BPE, its 256 byte tokens and special tokens included (at least 260);
    ignored when `path` is set (GPT-2's tokenizer, the paper's: 50257, spec section 2)."""
    train_max_chars: int = 200_000_000
    """Characters of training documents fed to the BPE trainer (bounds time and memory)."""

    def check(self, cfg: Config) -> None:
        if self.path is None:
            _need(self.vocab_size >= 260, "tokenizer.vocab_size", "must be at least 260 (256 bytes + specials)")


@dataclass
class ModelConfig(Section):
    """The shared GPT-2-style backbone (`cocomix.model`)."""

    n_embd: int = 128
    """Residual-stream width d, a multiple of `n_head`. The paper (spec section 2), 69M / 386M / 1.38B:
    CoCoMix 512 / 1024 / 2048; NTP and KD 624 / 1072 / 2096 (matched to CoCoMix's active parameters;
    config/paper.yaml uses 624 / 1080 / 2112, the closest widths whose heads can be multiples of 8 wide)."""
    n_layer: int = 4
    """Transformer blocks L (the paper: 8 at 69M, 24 at 386M and 1.38B; spec section 2)."""
    n_head: int = 4
    """Attention heads per block; head width = n_embd / n_head, best a multiple of 8 for GPU attention
    kernels (the paper: 8 at 69M, 16 at 386M and 1.38B; config/paper.yaml's baselines 13 / 15 / 22)."""
    n_positions: int | None = None
    """Learned position table size; default `train.block_size`."""
    vocab_size: int | None = None
    """The model's real vocabulary (token ids it predicts); default: the tokenizer's vocabulary size."""
    vocab_multiple: int = 64
    """Pad the embedding / LM-head rows to a multiple of this (1: no padding), e.g. GPT-2's 50257 -> 50304,
    a faster matmul size for the LM head (~40% of the 69M model's FLOPs). Padding ids get -inf logits, so
    losses, perplexity, evaluation and generation equal the unpadded model's; parameter and FLOP counts
    include the padding rows (they are stored and multiplied)."""
    dropout: float = 0.0
    """Applied to embeddings, attention probabilities and residual branches."""
    init_std: float = 0.02
    """Standard deviation of the N(0, init_std) initialisation of linear weights and embeddings; the
    residual output projections are further scaled by 1/sqrt(2 * n_layer) (GPT-2 and the official
    code, spec section 2)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (GPT-2's 1e-5)."""
    init_from: str | None = None
    """Start from these weights instead of a fresh init (continued pretraining): one of our checkpoints, a
    run folder (its latest checkpoint) or a transformers GPT-2 folder. Weights only: the optimizer, the
    schedule and the data order start afresh. The model's tensors the checkpoint lacks (a slot module's,
    starting CoCoMix from an NTP run) keep their fresh init; a tensor of another shape is one line naming it."""

    def check(self, cfg: Config) -> None:
        t = cfg.train
        _need(self.n_embd > 0, "model.n_embd", "must be positive")
        _need(self.n_head > 0, "model.n_head", "must be positive")
        _need(self.n_embd % self.n_head == 0, "model.n_embd",
              f"{self.n_embd} is not divisible by model.n_head={self.n_head}")
        _need(self.n_layer > 0, "model.n_layer", "must be positive")
        _need(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _need(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size", "must be positive")
        _need(self.vocab_multiple > 0, "model.vocab_multiple", f"must be positive (1: none), got {self.vocab_multiple}")
        _need(self.n_positions is None or self.n_positions >= t.block_size, "model.n_positions",
              f"{self.n_positions} is smaller than train.block_size={t.block_size}")


@dataclass
class TrainConfig(Section):
    """Optimisation and the token budget. Batch sizes count sequences of `block_size`."""

    tokens: int = 2_000_000
    """Training budget in tokens; steps = tokens // (global_batch_size * block_size). More than
    MAX_EPOCHS (16) passes over the training split is refused unless `allow_repeat`."""
    allow_repeat: bool = False
    """Allow a budget of more than MAX_EPOCHS passes over the training split (past about 16 epochs
    repeated data adds almost nothing: Muennighoff et al. 2023, so a larger budget is usually a typo)."""
    memory_check: bool = True
    """Before anything is allocated, refuse a model and micro-batch whose training memory (a lower
    bound: weights, gradients, AdamW state, activations) exceeds the device's free memory, in one line
    with the estimate and the largest micro-batch that fits. false: try anyway."""
    block_size: int = 128
    """Tokens per training sequence, the context length (the paper: 1024, spec section 2); held-out
    evaluation uses non-overlapping blocks of the same length."""
    global_batch_size: int = 32
    """Sequences per optimizer step summed over processes and accumulation steps."""
    micro_batch_size: int = 16
    """Most sequences per forward pass on one process (a memory cap): with more processes than
    global_batch_size / micro_batch_size, each runs its whole share in one smaller pass."""
    lr: float = 1e-3
    """Peak AdamW learning rate, reached after warm-up (the paper: 6e-4 / 3e-4 / 2e-4 at 69M / 386M /
    1.38B, spec section 2)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (spec section 2: 10% of peak)."""
    warmup_steps: int | None = None
    """Default: max(1, steps // 300), as in the paper."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on all parameters (one group, as the official code; spec section 2)."""
    beta1: float = 0.9
    """AdamW beta1 (spec section 2)."""
    beta2: float = 0.95
    """AdamW beta2 (spec section 2)."""
    eps: float = 1e-8
    """AdamW epsilon (spec section 2)."""
    grad_clip: float = 1.0
    """Clip the global L2 norm of the gradient to this before each step; 0 disables (spec section 2: 1.0)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 elsewhere."""
    compile: bool = False
    """Train through `torch.compile(model)` (the official code compiles); the first steps are slower."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several processes share the model (cocomix/parallel.py). ddp: each holds all of it (the
    official code). fsdp: FSDP2 shards weights, gradients and AdamW state over the processes (1/N each),
    for models that do not fit one device; the same losses as ddp to float rounding, and checkpoints
    that resume under either setting on any number of processes."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a third
    more compute for activation memory of one tensor a block (larger models or micro-batches)."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in the run folder; never; or a checkpoint path."""
    data_seed: int | None = None
    """Seed of the block permutation. null (default): the run's `seed`, so seeds vary the data order as
    well as the initial weights, while every method of one seed sees the same order (comparisons pair
    methods by seed). An integer fixes the order across seeds on purpose."""
    log_every_steps: int = 10
    """Optimizer steps between records of train/loss, learning rate, gradient norm and throughput
    (metrics.jsonl and MLflow); the last step is always recorded."""

    def warmup_for(self, tokens: int | None = None) -> int:
        """The warm-up steps of a run of `tokens` (default `tokens`): `warmup_steps`, or when null
        max(1, steps // 300). The trainer's schedule and `cocomix tune` read it here."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, (tokens or self.tokens) // (self.global_batch_size * self.block_size) // 300)

    def check(self, cfg: Config) -> None:
        _need(self.block_size >= 2, "train.block_size", "must be at least 2")
        _need(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _need(self.global_batch_size > 0 and self.global_batch_size % self.micro_batch_size == 0,
              "train.global_batch_size",
              f"{self.global_batch_size} is not a positive multiple of train.micro_batch_size={self.micro_batch_size}")
        _need(self.tokens >= self.global_batch_size * self.block_size, "train.tokens",
              "budget is smaller than one optimizer step")
        _need(self.lr > 0, "train.lr", "must be positive")
        _need(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _need(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")


def split_batch(global_batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """How `world_size` processes share one optimizer step: (sequences per forward pass on each
    process, accumulation steps). The global batch is split evenly; each process runs passes of at
    most `micro_batch_size`, all of one size. The same split whatever the number of processes gives
    the same mean loss, so results do not depend on it."""
    if global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size={global_batch_size} cannot be split evenly over "
                          f"{world_size} processes")
    per_rank = global_batch_size // world_size
    micro = min(micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(f"train.global_batch_size={global_batch_size} over {world_size} processes is {per_rank} "
                          f"sequences each, not a multiple of train.micro_batch_size={micro_batch_size}")
    return micro, per_rank // micro


@dataclass
class EvalConfig(Section):
    """Held-out loss during training (non-overlapping blocks of the validation shards)."""

    every_tokens: int = 500_000
    """Held-out loss every this many training tokens, and at the end (the sample-efficiency curve)."""
    max_blocks: int | None = 200
    """Evaluate on the first N validation blocks (None: all)."""
    batch_size: int = 16
    """Validation blocks per forward pass (in training, `cocomix eval` perplexity, SAE evaluation)."""
    # ---- `cocomix eval` (evals/): held-out perplexity on all blocks + lm-evaluation-harness ----
    tasks: list[str] = field(default_factory=lambda: ["paper", "synthetic"])
    """lm-eval task names, `synth_topic` / `synth_recall`, or the aliases `paper` (the paper's seven)
    and `synthetic` (tasks generated from the synthetic corpus; skipped for other sources)."""
    task_data: str | None = "../shared/data/evals"
    """Local copies of the paper's benchmarks (offline); null loads them from the Hugging Face Hub."""
    harness_batch_size: int | Literal["auto"] = 64
    """lm-eval batch size (the paper: 64); auto finds the largest that fits the device."""
    limit: int | None = None
    """Documents per lm-eval task (smoke runs); null = all."""
    ppl_max_blocks: int | None = None
    """Validation blocks for `cocomix eval` perplexity; null = all (the paper's protocol)."""
    synthetic_docs: int = 500
    """Documents per generated synthetic task."""
    diagnostics: bool = True
    """At every in-training evaluation of an interleaving model (CoCoMix, its interleaving ablations,
    pause): the read-out slot's attention to its own token, its uniform baseline, and the loss with
    the concept code removed (`val/readout_self_attn`, `..._uniform`, `val/loss_no_concept`;
    cocomix/diagnostics.py). Two more forwards per evaluation batch, one with eager attention."""
    task_seed: int = 0
    """Seed of the generated synthetic task documents: one set for every run and seed, so seeds and
    methods are scored on the same documents (their differences pair)."""
    split: Literal["val", "tune"] = "val"
    """What the in-training held-out loss (`val/*`) reads: `val`, the validation split the tables report,
    or `tune`, the tuning split: the last `tune_blocks` blocks of the training split, which the run then
    leaves out of training together with the one block before them (a gap, so that no training block
    ends where a tuning block begins). Tuning trials (`cocomix tune`) use `tune`: they never read `val`."""
    tune_blocks: int = 64
    """Blocks of the tuning split (`split: tune`); at most a quarter of the training split."""

    def check(self, cfg: Config) -> None:
        _need(self.every_tokens > 0, "eval.every_tokens", "must be positive")
        _need(self.tune_blocks >= 1, "eval.tune_blocks", f"must be at least 1, got {self.tune_blocks}")


@dataclass
class CheckpointConfig(Section):
    """Checkpoints of a run (`<run_dir>/checkpoints/step_<n>`): what resume continues from and what
    `cocomix eval` scores."""

    every_tokens: int = 1_000_000
    """Save a checkpoint every this many training tokens, and at the end (the DAG evaluates each one)."""
    keep_last: int = 2
    """Older checkpoints are deleted; 0 keeps all."""
    keep_optimizer: int = 2
    """The newest N checkpoints keep the optimizer state (trainer/optimizer.pt, twice the model's size in
    fp32) that resuming needs (2: a damaged newest checkpoint can fall back to the one before); older
    ones keep the model and the rest of the trainer state, all that evaluation reads. 0: all keep it."""

    def check(self, cfg: Config) -> None:
        _need(self.every_tokens > 0, "checkpoint.every_tokens", "must be positive")
        _need(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
        _need(self.keep_optimizer >= 0, "checkpoint.keep_optimizer", "must be >= 0 (0 keeps it in all)")


@dataclass
class TeacherConfig(Section):
    """The frozen LM whose SAE concepts supervise CoCoMix and whose logits KD distils."""

    path: str | None = None
    """A checkpoint folder: ours (e.g. an NTP run's checkpoint) or a transformers GPT-2 folder."""
    checkpoint_tokens: int | None = None
    """A departure (the official code uses its final teacher): when the teacher is a run folder (the
    DAG's own 'teacher' run, or `path` naming a run), use its checkpoint written at this many tokens
    instead of its latest: a weaker teacher. The teacher run must have written it
    (`checkpoint.every_tokens` of `dag.teacher`, and `keep_last: 0` or enough)."""
    training_flops: float | None = None
    """The training FLOPs of a given teacher (one this experiment does not train, e.g. GPT-2 124M:
    about 6 x 124M x its tokens), for the compute ledger; null: listed as not counted. A teacher run
    of this experiment is counted from its own metrics and ignores this."""

    def check(self, cfg: Config) -> None:
        _need(self.checkpoint_tokens is None or self.checkpoint_tokens > 0, "teacher.checkpoint_tokens",
              f"must be positive, got {self.checkpoint_tokens}")
        _need(self.training_flops is None or self.training_flops > 0, "teacher.training_flops",
              f"must be positive, got {self.training_flops}")


@dataclass
class SAEConfig(Section):
    """TopK sparse autoencoder on the teacher's residual stream (spec section 1.1)."""

    layer: int = 5
    """0-based teacher block whose output is read (GPT-2 `blocks.5.hook_resid_post`, the 6th block)."""
    n_latents: int = 32768
    """Dictionary size C."""
    k: int = 32
    """Active latents per token (TopK)."""
    aux_k: int = 256
    """Dead latents used by the AuxK loss."""
    aux_coef: float = 1.0 / 32
    """Weight of the AuxK loss on the reconstruction error (Gao et al. 2024: 1/32)."""
    dead_after_tokens: int = 10_000_000
    """A latent not active for this many tokens counts as dead."""
    tokens: int = 50_000_000
    """Activations (tokens) to train on."""
    batch_tokens: int = 4096
    """Activations (tokens) per SAE optimizer step."""
    buffer_tokens: int = 262_144
    """Shuffle buffer of streamed activations (bounded memory)."""
    lr: float = 2e-4
    """Adam learning rate of SAE training (betas 0.9 / 0.999; decoder columns kept at unit norm)."""
    path: str | None = None
    """Load a trained SAE instead of training one: ours, or OpenAI's GPT-2 state dict (.pt)."""

    def check(self, cfg: Config) -> None:
        _need(self.layer >= 0, "sae.layer", "must be >= 0")
        _need(0 < self.k <= self.n_latents, "sae.k", f"must be in [1, sae.n_latents={self.n_latents}]")


@dataclass
class ConceptConfig(Section):
    """Concept labels (spec 1.2) and CoCoMix's prediction, compression and mixing (spec 1.3-1.6).
    Defaults follow the official code; the paper's variants are options."""

    k_attr: int = 4
    """Labels per token: top-K_attr attribution scores."""
    scoring: Literal["attribution", "attribution_preact", "activation"] = "attribution"
    """attribution: (dL/dh . W_dec) * c (code); attribution_preact: times the pre-TopK activation
    (paper v1); activation: top activations (the paper's ablation)."""
    loss_scope: Literal["sequence_mean", "next_token"] = "sequence_mean"
    """Gradient of the whole-sequence mean loss (code) or of each position's next-token loss (paper)."""
    labels: Literal["cached", "online"] = "cached"
    """Read labels from the extracted cache, or recompute them with teacher + SAE every step."""
    cache_dir: str | None = None
    """Default: <experiment_dir>/concepts."""
    extract_batch_size: int = 64
    """Blocks per teacher forward+backward in `extract-concepts`; also the chunk that is fsynced at
    once (the resume granularity). Changing it restarts an interrupted extraction."""
    label_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """Arithmetic of `extract-concepts` (recorded in the cache manifest): fp32 (the official code and
    online labels: no autocast, TF32 off), tf32 (fp32 with TF32 matmuls on CUDA; fp32 on CPU) or
    bf16 (bf16 autocast, on CPU too; some labels change: 92.5% of label tuples and 98.8% of the
    top-k sets agree with fp32 on the tiny test teacher). A cache of another precision is refused."""
    insert_layer: int = 3
    """Student blocks before the concept head / interleaving (code: 3 at 69M, 5 at 386M and 1.38B)."""
    k: int = 32
    """TopK of the predicted concept logits kept for compression."""
    lam: float = 0.1
    """Weight of the concept loss."""
    mix: Literal["interleave", "add", "none"] = "interleave"
    """How the continuous concept enters the stream: interleaved slots (CoCoMix), added to the
    hidden state (the paper's intervention ablation), or not at all (prediction only)."""
    target: Literal["concepts", "hidden_l2", "hidden_cosine"] = "concepts"
    """Predict SAE concepts (CoCoMix) or regress the teacher's hidden state (ablation)."""
    readout: Literal["concept", "token"] = "concept"
    """Which interleaved slot the LM head reads: the concept slot after token t (the paper and the
    official code), or token t's own slot (an ablation, like `pause.readout: token`: the concept slots
    are then extra positions later tokens attend to). Needs `mix: interleave`."""
    init_scale: float = 1.0
    """A departure from the official code (1.0, its init): the concept predictor's and compression
    table's N(0, model.init_std) init times this. The concept slot's norm relative to its token's at
    init (`cocomix config --slot-ratio` prints it, training logs train/slot_norm_ratio) grows with its
    square: 0.17 at the paper's 69M shape (d 512, C 32768, k 32) but about 0.04 at tiny's (d 128,
    C 512, k 16), where the slot starts almost empty. About 2 on tiny matches the 69M ratio."""

    def check(self, cfg: Config) -> None:
        n_layer, sae = cfg.model.n_layer, cfg.sae
        _need(0 < self.insert_layer < n_layer, "concept.insert_layer",
              f"{self.insert_layer} must be between 1 and model.n_layer-1={n_layer - 1}")
        _need(self.k_attr > 0, "concept.k_attr", "must be positive")
        _need(0 < self.k <= sae.n_latents, "concept.k", f"must be in [1, sae.n_latents={sae.n_latents}]")
        _need(self.lam >= 0, "concept.lam", "must be >= 0")
        _need(self.init_scale > 0, "concept.init_scale", f"must be positive, got {self.init_scale}")
        _need(self.readout == "concept" or self.mix == "interleave", "concept.readout",
              f"'{self.readout}' needs concept.mix: interleave (with mix: {self.mix} there is one slot per token)")
        _need(self.k_attr <= sae.k or self.scoring == "attribution_preact", "concept.k_attr",
              f"{self.k_attr} labels cannot come from sae.k={sae.k} active latents")
        _need(self.labels == "cached" or self.label_precision == "fp32", "concept.label_precision",
              f"{self.label_precision} applies to cached labels only; concept.labels=online computes them in fp32")


@dataclass
class KDConfig(Section):
    """Knowledge distillation (spec section 3): CE + lam * KL(teacher || student)."""

    lam: float = 0.1
    """lam_KD, the weight of the KL term (paper App. A: 0.1, "consistently strong"; spec section 3)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions; the KL is multiplied by temperature^2 so `lam` keeps
    its meaning (the paper does not state it; spec section 3 assumes 1)."""

    def check(self, cfg: Config) -> None:
        _need(self.temperature > 0, "kd.temperature", "must be positive")


@dataclass
class PauseConfig(Section):
    """Pause tokens (spec section 3): one learnable vector interleaved after every token at
    `concept.insert_layer`; the LM head reads the pause slots."""

    readout: Literal["pause", "token"] = "pause"
    """Which slot the LM head reads for token t+1: the pause slot after token t (as CoCoMix reads its
    concept slot; the default), or token t's own slot, the pause slots then being extra positions
    that later tokens attend to. The paper does not say (spec section 6, question 5); docs/baselines.md,
    "Pause read-out", has what each gives at tiny scale."""


@dataclass
class InterpretConfig(Section):
    """Concept descriptions for `cocomix inspect` / `cocomix steer` (`cocomix/interpret.py`)."""

    describe_tokens: int = 200_000
    """Training-split tokens scanned (from the start) for each latent's top-activating contexts."""
    contexts: int = 5
    """Top-activating contexts kept per latent."""
    context_before: int = 10
    """Tokens shown before the active token of a context."""
    context_after: int = 3
    """Tokens shown after it."""
    top_tokens: int = 8
    """Output tokens each latent promotes most (logit lens of its decoder direction)."""
    match_tokens: int = 20_000
    """Synthetic corpus: validation tokens on which latents are matched to ground-truth concepts (AUROC)."""

    def check(self, cfg: Config) -> None:
        for key in ("describe_tokens", "contexts", "top_tokens", "match_tokens"):
            _need(getattr(self, key) > 0, f"interpret.{key}", "must be positive")
        for key in ("context_before", "context_after"):
            _need(getattr(self, key) >= 0, f"interpret.{key}", "must be >= 0")


@dataclass
class TrackingConfig(Section):
    """Where each run's parameters, metrics and artifacts are logged besides its own folder
    (`cocomix/tracking.py`): MLflow, Weights & Biases, or nothing."""

    backend: Literal["mlflow", "wandb", "none"] = "mlflow"
    """mlflow: an MLflow run (`uri`); wandb: a W&B run (the `wandb` extra; WANDB_MODE=offline keeps it
    under the run folder for `wandb sync`); none: only the run folder's own files."""
    uri: str | None = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite under results_dir."""
    enabled: bool = True
    """Log to the backend; false: as backend none (only the run folder's own files: config.yaml,
    metrics.jsonl, checkpoints)."""
    project: str | None = None
    """W&B project; default the experiment's name (`experiment`)."""
    entity: str | None = None
    """W&B entity (user or team); default the logged-in user's."""
    parent_run_id: str | None = None
    """Nest this run under another tracked run (`cocomix sweep` sets it for each trial; MLflow only)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the run (e.g. the sweep trial number)."""
    required: bool = False
    """An unreachable tracking server stops the command with one line; false: one warning line, the run
    goes on with metrics.jsonl as its record and reaches MLflow later (`cocomix track-sync`)."""


@dataclass
class SweepParam(Section):
    """One dimension of the search space: `int`/`float` between low and high (log scale if `log`),
    or `categorical` over `choices`."""

    type: Literal["int", "float", "categorical"] = "int"
    """int / float: a number from `low` to `high`; categorical: one of `choices`."""
    low: float | None = None
    """int / float: the lower bound, inclusive (> 0 on a log scale)."""
    high: float | None = None
    """int / float: the upper bound, inclusive."""
    log: bool = False
    """int / float: sample on a log scale (Optuna `log=True`)."""
    choices: list[Any] | None = None
    """categorical: the values to choose from."""


@dataclass
class SweepConfig(Section):
    """Optuna search over CoCoMix's design choices (`cocomix sweep`, cocomix/sweep.py). Every trial
    is a `cocomix` run of `tokens` tokens scored by its final held-out loss."""

    method: str = "cocomix"
    """The method every trial trains (a name in the registry); `cocomix tune` runs one study per method.
    For cocomix, concept.insert_layer and concept.k are always searched."""
    study: str | None = None
    """Default: <experiment>-sweep. Rerunning with the same name continues the study."""
    storage: str | None = None
    """Any SQLAlchemy URL; default: sqlite under <experiment_dir>/sweeps/ (one machine)."""
    n_trials: int = 8
    """Trials the study should hold in the end (complete, pruned or failed), over all workers."""
    workers: int = 1
    """Worker processes `cocomix sweep` starts here (0: only create the study and write the outputs)."""
    tokens: int | None = None
    """Training tokens per trial; default train.tokens. Held-out loss is reported every eval.every_tokens."""
    space: dict[str, SweepParam] = field(default_factory=dict)
    """Dotted config key -> range. concept.insert_layer and concept.k are always searched (default
    ranges: 1..n_layer-1 and concept.k/4..4*concept.k on a log scale); concept.lam, concept.k_attr or
    any other key are optional."""
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    """Configurations tried first (e.g. the paper's defaults), added once when the study is created."""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna sampler: tpe (TPESampler, after `n_startup_trials` random trials) or random."""
    n_startup_trials: int = 4
    """Random trials before TPE models the space."""
    seed: int = 0
    """Sampler seed; worker i uses seed + i, so parallel workers do not propose the same points."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stops poor trials early on their held-out loss reports: median (MedianPruner), hyperband
    (resources from eval.every_tokens to the trial's tokens), or none."""
    pruner_startup_trials: int = 2
    """Median pruner: trials that finish before any is pruned."""
    heartbeat_s: int = 30
    """Workers record a heartbeat this often; a trial silent for grace_s (its worker was killed) is
    failed and queued again with the same parameters, resuming from its checkpoint."""
    grace_s: int = 120
    """Seconds without a heartbeat after which a running trial counts as dead (see heartbeat_s)."""


@dataclass
class TuneConfig(Section):
    """Equal tuning of every method (`cocomix tune`, cocomix/tune.py): one Optuna study per method of
    `dag.methods`, each with the same trials, tokens per trial, sampler and seed, over the method's own
    knobs (`Method.tune_space`), scored on the tuning split (`eval.split: tune`), never on validation."""

    n_trials: int = 6
    """Trials per method (complete, pruned or failed); every method gets the same number."""
    tokens: int | None = None
    """Training tokens per trial; default train.tokens."""
    seed: int = 0
    """Sampler seed, the same for every method's study."""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna sampler of every study (TPE after `n_startup_trials` random trials, or random)."""
    n_startup_trials: int = 3
    """Random trials before TPE models the space."""
    pruner: Literal["median", "none"] = "none"
    """none: every trial runs its whole budget (the fairest use of equal trials); median: stop a trial
    whose tuning loss is worse than the median of earlier trials at the same point."""
    defaults_first: bool = True
    """The first trial of every study is the method's configured values (the paper's defaults), so a
    tuned method is never worse on the tuning split than its defaults."""
    space: dict[str, dict[str, SweepParam]] = field(default_factory=dict)
    """Method -> dotted key -> range, replacing or adding to the method's default knobs key by key
    (docs/fair.md); a range with `low` = `high` fixes the key."""

    def check(self, cfg: Config) -> None:
        _need(self.n_trials >= 1, "tune.n_trials", f"must be at least 1, got {self.n_trials}")
        for name in self.space:
            _need(name in cfg.dag.methods, f"tune.space.{name}", f"expected a method of dag.methods {cfg.dag.methods}")
        _need(self.tokens is None or self.tokens > 0, "tune.tokens", "must be positive")


@dataclass
class DagConfig(Section):
    """What `snakemake` runs for this experiment (see `cocomix/dag.py` and the Snakefile)."""

    methods: list[str] = field(default_factory=lambda: ["ntp"])
    """Methods trained at every scale and seed: names in the method registry (`cocomix.methods`)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the main runs, each a run `<method>-<scale>-s<seed>` (the official code: 22)."""
    data_seeds: list[int] = field(default_factory=list)
    """Data-order seeds crossed with the seeds: every main and ablation run runs once per data seed d (run
    `<method>-<scale>-s<seed>-d<d>`, train.data_seed=d), so the seed sets only the initial weights and the
    report splits the spread into init and data order (its seed_variance table). One seed and several data
    seeds vary the data order alone; several seeds and one data seed, the init alone. Empty: each seed
    sets both (the default)."""
    method_seeds: dict[str, list[int]] = field(default_factory=dict)
    """Method -> its seeds, for methods that run fewer (or other) seeds than `seeds`: e.g. NTP and
    CoCoMix at 3 seeds and KD at 1. Comparisons against NTP pair by seed, so they use the seeds both have."""
    scales: list[str] = field(default_factory=list)
    """Names from `scales`; empty: the config as it is (scale name 'base')."""
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Name -> dotted overrides on top of method `cocomix` (run name <ablation>-<scale>-s<seed>)."""
    ablation_seeds: list[int] | None = None
    """Seeds of the ablation runs; default `seeds`."""
    ablation_scales: list[str] | None = None
    """Scales of the ablation runs; default `scales` (the paper ablates at 69M only)."""
    evaluate: bool = True
    """Run `cocomix eval` on every checkpoint of every run (tasks from `eval.tasks`)."""
    evaluate_in_train: bool = True
    """Evaluate a run's checkpoints at the end of its training job (`cocomix train --eval`: one process,
    one start-up of torch, transformers and lm-eval); false: a separate `evaluate` job per run."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides for the teacher, an NTP run named 'teacher', trained when teacher.path is unset."""
    compute_matched: bool = False
    """Add NTP arms whose token budgets match each other method's training FLOPs, per seed: `ntp=<method>`
    (student + online teacher, the per-step cost) and `ntp=<method>+` (plus its share of the teacher's
    training, the SAE's and label extraction, amortised over the runs that read them). Each arm's budget
    is read from its method's run when the arm starts (cocomix/compute.py)."""
    tuned: bool = False
    """Every main run uses the values its method's tuning study chose (`tune`, `cocomix tune`; the DAG
    runs the studies first); ablations take CoCoMix's, under their own overrides."""

    def check(self, cfg: Config) -> None:
        for name, seeds in self.method_seeds.items():
            _need(name in self.methods, f"dag.method_seeds.{name}", f"must name a method of dag.methods {self.methods}")
            _need(len(seeds) > 0, f"dag.method_seeds.{name}", "must be a non-empty list of integer seeds")
        for i, name in enumerate(self.ablation_scales or []):
            _need(name in cfg.scales, f"dag.ablation_scales[{i}]",
                  f"{name!r} is not defined under 'scales' ({sorted(cfg.scales)})")
        for i, name in enumerate(self.scales):
            _need(name in cfg.scales, f"dag.scales[{i}]", f"{name!r} is not defined under 'scales' ({sorted(cfg.scales)})")


@dataclass
class Config:
    """A whole experiment. `run_dir` = results_dir/experiment/runs/<method>-<scale>-s<seed>."""

    experiment: str = "tiny"
    """Experiment name: its folder under results_dir, and the MLflow experiment its runs log to."""
    results_dir: str = "results"
    """Root folder of every output (data, runs, SAE, concept labels, reports, the default MLflow store)."""
    method: str = "ntp"
    """Training method: a name in the method registry (`cocomix.methods`, e.g. ntp or cocomix). The
    registry checks it (the CLI asks it first); this module does not know the list."""
    seed: int = 0
    """Seed of the run: torch's generator before the model is built (initial weights, then dropout) and
    the SAE's own streams (the official code: 22), and the data order unless `train.data_seed` fixes
    it. Evaluation documents do not depend on it (`eval.task_seed`): every seed is scored on the same."""
    scale: str | None = None
    """Which entry of `scales` to apply (e.g. 69M); null: the file as it is (run name 'base')."""
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named sets of dotted overrides; `scale` picks one."""
    method_overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """method -> scale name ('base' when no scale is selected) -> dotted overrides, applied after the
    scale's for the selected method; e.g. CoCoMix's 512 width where NTP uses the matched 624 (spec 2)."""
    run_name: str | None = None
    """Default: <method>-<scale or 'base'>-s<seed>."""
    runs_dir: str | None = None
    """Folder of run folders; default <experiment_dir>/runs (sweep trials live elsewhere)."""
    license: str = "mit"
    """The license an exported model card declares (`cocomix export`; a Hub license id, e.g. apache-2.0):
    the code's is MIT (LICENSE); weights trained on data with its own terms may need another."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus, its train/val split and its token shards (`cocomix prepare-data`)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer the shards are made with: a BPE trained on the corpus, or a folder (GPT-2's)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone every method shares; a method adds its own modules on top."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, learning-rate schedule, batch sizes and token budget of `cocomix train`."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out loss during training, and `cocomix eval` (perplexity and lm-eval tasks)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are saved and how many are kept."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow logging."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher LM of CoCoMix's concept labels and of the KD baselines."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The TopK SAE that turns the teacher's activations into concepts (`cocomix train-sae`)."""
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    """CoCoMix: concept labels (`cocomix extract-concepts`), prediction, compression and mixing."""
    kd: KDConfig = field(default_factory=KDConfig)
    """The knowledge-distillation baselines (methods kd and kd_pause)."""
    pause: PauseConfig = field(default_factory=PauseConfig)
    """The pause-token baselines (methods pause and kd_pause)."""
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
    """Concept descriptions for `cocomix inspect` and `cocomix steer`."""
    dag: DagConfig = field(default_factory=DagConfig)
    """The experiment grid `snakemake` runs: methods x scales x seeds, ablations, evaluation."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The Optuna search of `cocomix sweep`."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Equal tuning of every method (`cocomix tune`)."""

    def check(self, cfg: Config) -> None:
        """The top-level keys (`cfg` is this config)."""
        for method, per_scale in self.method_overrides.items():
            for scale in per_scale:
                _need(scale in self.scales or scale == "base", f"method_overrides.{method}.{scale}",
                      f"not 'base' nor a scale under 'scales' ({sorted(self.scales)})")
        if self.scale is not None:
            _need(self.scale in self.scales, "scale",
                  f"{self.scale!r} is not defined under 'scales' ({sorted(self.scales)})")

    # ---- derived locations (pure functions of the config) ----
    @property
    def experiment_dir(self) -> Path:
        return Path(self.results_dir) / self.experiment

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.experiment_dir / "data"

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.method}-{self.scale or 'base'}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return (Path(self.runs_dir) if self.runs_dir else self.experiment_dir / "runs") / self.resolved_run_name

    @property
    def concept_dir(self) -> Path:
        if self.concept.cache_dir:
            return Path(self.concept.cache_dir)
        # One cache per way of scoring labels, so an ablation that scores differently gets its own.
        c = self.concept
        return self.experiment_dir / "concepts" / f"{c.scoring}-{c.loss_scope}-k{c.k_attr}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Building and validation
# --------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    """`value` as the first member of the union `args` it fits (None only where the union allows it)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")


MAX_INT = 10**15  # no integer setting (a budget, a size, a seed) is larger: above it, a typo (1e30)
MAX_EPOCHS = 16  # passes over the training split a budget may take without train.allow_repeat


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against bool, int, float or str (numbers may come as YAML strings like `1e6`)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected bool, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads `1e6` (no dot) as a string; accept numbers written that way.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected int, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # allow 2e6 in YAML
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                raise ConfigError(f"config key '{key}': {value:.3g} is beyond {MAX_INT:.0e}, the largest integer any "
                                  "setting takes (10^15 tokens is about 50x the largest public pretraining runs)")
            return value
        raise ConfigError(f"config key '{key}': expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected str, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (expected one of: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse a command-line override value with YAML rules (`1e-3`, `true`, `[a, b]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section; cannot set '{dotted}'")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. model.n_embd=128)")
        key, text = item.split("=", 1)
        out.append((key.strip(), _parse_scalar(text)))
    return out


def _sections(node: Any):
    """The sections under `node`, depth first in field order (a section before its subsections)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, Section):
            yield value
            yield from _sections(value)


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express: every section's `check`, then the top
    level's. The first failure is raised."""
    for section in _sections(cfg):
        section.check(cfg)
    cfg.check(cfg)
    return cfg


def read_yaml(path: str | Path) -> Any:
    """The project's reader of YAML files (run configs, task definitions): undecodable or unparsable
    content is one line naming the file (FileFormatError)."""
    from cocomix.files import FileFormatError, read_text  # lazy: files is below config, but config stays light

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise FileFormatError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults), apply the selected scale and CLI overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found")
        from cocomix.files import FileFormatError, read_text  # lazy: files is below config, but config stays light

        try:
            tree = yaml.safe_load(read_text(p)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
        except FileFormatError as e:
            raise ConfigError(f"config file {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}': expected a mapping at the top level")
    cli = parse_overrides(overrides or [])
    # The scale and the method (which pick override tables) may themselves be chosen on the command line.
    for key, value in cli:
        if key in ("scale", "method"):
            tree[key] = value
    base = _build(Config, tree)  # validates keys and types of the file itself
    if base.scale is not None:
        if base.scale not in base.scales:
            raise ConfigError(f"config key 'scale': {base.scale!r} is not defined under 'scales' ({sorted(base.scales)})")
        for key, value in base.scales[base.scale].items():
            _set_dotted(tree, key, value)
    for key, value in base.method_overrides.get(base.method, {}).get(base.scale or "base", {}).items():
        _set_dotted(tree, key, value)
    for key, value in cli:
        _set_dotted(tree, key, value)
    return validate(_build(Config, tree))


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a resolved config (e.g. from a run folder's `config.yaml`)."""
    return validate(_build(Config, tree))


def dump_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """{dataclass name: {field name: its attribute docstring}}, read from this file's source."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs[node.name] = {}
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe_config(cfg: Config) -> str:
    """The resolved config as YAML, each field preceded by its docstring as `# ...` lines.
    `yaml.safe_load` of the text gives back exactly `cfg.to_dict()`."""
    docs = field_docs()
    lines = ["# The resolved config (file, then the scale's overrides, then method_overrides, then the",
             "# command line). Each key is preceded by its docstring (cocomix/config.py)."]

    def emit(section: Any, values: dict[str, Any], indent: str) -> None:
        for f in dataclasses.fields(section):
            doc = docs.get(type(section).__name__, {}).get(f.name, "")
            lines.extend(f"{indent}# {line}".rstrip() for line in doc.splitlines())
            value = getattr(section, f.name)
            if isinstance(value, Section) and dataclasses.fields(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, values[f.name], indent + "  ")
            else:
                text = yaml.safe_dump({f.name: values[f.name]}, sort_keys=False, width=1 << 16)
                lines.extend(indent + line for line in text.splitlines())

    emit(cfg, cfg.to_dict(), "")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Fingerprints: which config changes make a result stale
# --------------------------------------------------------------------------------------

# Sections every run depends on, whatever its method (a method adds the sections it reads)...
RUN_SECTIONS = ("experiment", "method", "seed", "data", "tokenizer", "model", "train", "eval")
# ...less the keys that change how a run is executed or stored, not what it computes.
EXECUTION_KEYS = ("train.resume", "train.compile", "train.log_every_steps", "train.allow_repeat", "train.memory_check",
                  "train.parallel", "train.activation_checkpointing", "teacher.training_flops", "data.dir")


def fingerprint(cfg: Config, keys: tuple[str, ...] | list[str], drop: tuple[str, ...] = (),
                extra: dict[str, Any] | None = None) -> str:
    """16 hex digits of sha256 over the given dotted config keys (sections or single fields) of the
    resolved config, leaving out EXECUTION_KEYS and `drop` (dotted), plus `extra` values. The one
    fingerprint of runs, the SAE, label caches and sweeps: a rerun resumes only when it is unchanged."""
    tree = cfg.to_dict()
    for dotted in EXECUTION_KEYS + tuple(drop):
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    picked: dict[str, Any] = dict(extra or {})
    for dotted in keys:
        if any(dotted == d or dotted.startswith(d + ".") for d in drop):
            continue  # a single field (e.g. pause's concept.insert_layer) that a sweep searches
        node = tree
        for part in dotted.split("."):
            node = node[part]
        picked[dotted] = node
    return sha256_json(picked)[:16]
