"""Typed experiment configuration: YAML in, validated dataclasses out.

A config file is a nested mapping whose sections mirror the dataclasses below. Two optional
tables of *dotted overrides* make one file describe a whole grid:

    scale: 69M                      # which entry of `scales` to apply
    scales:
      69M: {model.n_embd: 624, model.n_layer: 8, train.lr: 6.0e-4}

Resolution order: file values, then the selected scale's overrides, then command-line
overrides (`model.n_embd=128`). The result is validated once; nothing mutates it afterwards
(run state lives in checkpoints, not in the config).

Every error is a `ConfigError` whose message is a single line naming the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message is one line that names the key."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The embedded concept-driven language (see `cocomix.data.synthetic`)."""

    n_tokens: int = 3_000_000
    """Approximate number of words to generate (train + val)."""
    n_topics: int = 12
    """Number of latent topics; each owns its own nouns, verbs and adjectives."""
    words_per_topic: int = 40
    """Content words per part of speech per topic."""
    n_professions: int = 8
    """Entity attributes: each entity introduced in a document has one profession."""
    seed: int = 1234


@dataclass
class DataConfig:
    """Where the corpus comes from and where tokenised shards go."""

    source: Literal["synthetic", "text", "hf"] = "synthetic"
    paths: list[str] = field(default_factory=list)
    """`text` source: .txt/.jsonl/.parquet files or folders of them."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet/hf rows."""
    strip_gutenberg: bool = False
    """Strip Project Gutenberg licence headers and footers (`text` source)."""
    hf_path: str | None = None
    """`hf` source: a dataset name or local path for `datasets.load_dataset`."""
    hf_name: str | None = None
    hf_split: str = "train"
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (OpenWebText recipe: 0.0005)."""
    split_seed: int = 2357
    max_docs: int | None = None
    """Use only the first N documents (smoke runs)."""
    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""
    dir: str | None = None
    """Output folder; default `<results_dir>/<experiment>/data`."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the corpus, or load an existing tokenizer folder."""

    path: str | None = None
    """Existing tokenizer folder (e.g. GPT-2's); when set nothing is trained."""
    vocab_size: int = 2048
    train_max_chars: int = 200_000_000
    """Characters of training documents fed to the BPE trainer (bounds time and memory)."""


@dataclass
class ModelConfig:
    """The shared GPT-2-style backbone (`cocomix.model`)."""

    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int | None = None
    """Learned position table size; default `train.block_size`."""
    vocab_size: int | None = None
    """Default: the tokenizer's vocabulary size."""
    dropout: float = 0.0
    """Applied to embeddings, attention probabilities and residual branches."""
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5


@dataclass
class TrainConfig:
    """Optimisation and the token budget. Batch sizes count sequences of `block_size`."""

    tokens: int = 2_000_000
    """Training budget in tokens; steps = tokens // (global_batch_size * block_size)."""
    block_size: int = 128
    global_batch_size: int = 32
    """Sequences per optimizer step summed over processes and accumulation steps."""
    micro_batch_size: int = 16
    """Sequences per forward pass on one process."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (spec section 2: 10% of peak)."""
    warmup_steps: int | None = None
    """Default: max(1, steps // 300), as in the paper."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 elsewhere."""
    compile: bool = False
    resume: str = "auto"
    """auto: continue from the latest checkpoint in the run folder; never; or a checkpoint path."""
    data_seed: int = 0
    """Seed of the block permutation; identical across methods so all see the same order."""
    log_every_steps: int = 10


@dataclass
class EvalConfig:
    """Held-out loss during training (non-overlapping blocks of the validation shards)."""

    every_tokens: int = 500_000
    max_blocks: int | None = 200
    """Evaluate on the first N validation blocks (None: all)."""
    batch_size: int = 16
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


@dataclass
class CheckpointConfig:
    every_tokens: int = 1_000_000
    keep_last: int = 2
    """Older checkpoints are deleted; 0 keeps all."""


@dataclass
class TeacherConfig:
    """The frozen LM whose SAE concepts supervise CoCoMix and whose logits KD distils."""

    path: str | None = None
    """A checkpoint folder: ours (e.g. an NTP run's checkpoint) or a transformers GPT-2 folder."""


@dataclass
class SAEConfig:
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
    dead_after_tokens: int = 10_000_000
    """A latent not active for this many tokens counts as dead."""
    tokens: int = 50_000_000
    """Activations (tokens) to train on."""
    batch_tokens: int = 4096
    buffer_tokens: int = 262_144
    """Shuffle buffer of streamed activations (bounded memory)."""
    lr: float = 2e-4
    path: str | None = None
    """Load a trained SAE instead of training one: ours, or OpenAI's GPT-2 state dict (.pt)."""


@dataclass
class ConceptConfig:
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


@dataclass
class KDConfig:
    """Knowledge distillation (spec section 3): CE + lam * KL(teacher || student)."""

    lam: float = 0.1
    temperature: float = 1.0


@dataclass
class PauseConfig:
    """Pause tokens (spec section 3): one learnable vector interleaved after every token at
    `concept.insert_layer`; the LM head reads the pause slots."""

    readout: Literal["pause", "token"] = "pause"
    """Which slot the LM head reads for token t+1: the pause slot after token t (as CoCoMix reads its
    concept slot; the default), or token t's own slot, the pause slots then being extra positions
    that later tokens attend to. The paper does not say (spec section 6, question 5); README,
    "Pause read-out", has what each gives at tiny scale."""


@dataclass
class InterpretConfig:
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


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite under results_dir."""
    enabled: bool = True
    parent_run_id: str | None = None
    """Nest this run under an MLflow run (`cocomix sweep` sets it for each trial)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags on the run (e.g. the sweep trial number)."""


@dataclass
class SweepParam:
    """One dimension of the search space: `int`/`float` between low and high (log scale if `log`),
    or `categorical` over `choices`."""

    type: Literal["int", "float", "categorical"] = "int"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class SweepConfig:
    """Optuna search over CoCoMix's design choices (`cocomix sweep`, cocomix/sweep.py). Every trial
    is a `cocomix` run of `tokens` tokens scored by its final held-out loss."""

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
    n_startup_trials: int = 4
    """Random trials before TPE models the space."""
    seed: int = 0
    """Sampler seed; worker i uses seed + i, so parallel workers do not propose the same points."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = 2
    """Median pruner: trials that finish before any is pruned."""
    heartbeat_s: int = 30
    """Workers record a heartbeat this often; a trial silent for grace_s (its worker was killed) is
    failed and queued again with the same parameters, resuming from its checkpoint."""
    grace_s: int = 120


@dataclass
class DagConfig:
    """What `snakemake` runs for this experiment (see `cocomix/dag.py` and the Snakefile)."""

    methods: list[str] = field(default_factory=lambda: ["ntp"])
    seeds: list[int] = field(default_factory=lambda: [0])
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
    teacher: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides for the teacher, an NTP run named 'teacher', trained when teacher.path is unset."""


@dataclass
class Config:
    """A whole experiment. `run_dir` = results_dir/experiment/runs/<method>-<scale>-s<seed>."""

    experiment: str = "tiny"
    results_dir: str = "results"
    method: str = "ntp"
    seed: int = 0
    scale: str | None = None
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named sets of dotted overrides; `scale` picks one."""
    method_overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """method -> scale name ('base' when no scale is selected) -> dotted overrides, applied after the
    scale's for the selected method; e.g. CoCoMix's 512 width where NTP uses the matched 624 (spec 2)."""
    run_name: str | None = None
    """Default: <method>-<scale or 'base'>-s<seed>."""
    runs_dir: str | None = None
    """Folder of run folders; default <experiment_dir>/runs (sweep trials live elsewhere)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    pause: PauseConfig = field(default_factory=PauseConfig)
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
    dag: DagConfig = field(default_factory=DagConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

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

KNOWN_METHODS = ("ntp", "kd", "pause", "kd_pause", "cocomix")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
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
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # allow 2e6 in YAML
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


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    m, t = cfg.model, cfg.train
    need(cfg.method in KNOWN_METHODS, "method", f"expected one of {list(KNOWN_METHODS)}, got {cfg.method!r}")
    need(m.n_embd > 0, "model.n_embd", "must be positive")
    need(m.n_head > 0, "model.n_head", "must be positive")
    need(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    need(m.n_layer > 0, "model.n_layer", "must be positive")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be positive")
    need(t.block_size >= 2, "train.block_size", "must be at least 2")
    need(
        m.n_positions is None or m.n_positions >= t.block_size,
        "model.n_positions",
        f"{m.n_positions} is smaller than train.block_size={t.block_size}",
    )
    need(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(
        t.global_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not a positive multiple of train.micro_batch_size={t.micro_batch_size}",
    )
    need(t.tokens >= t.global_batch_size * t.block_size, "train.tokens", "budget is smaller than one optimizer step")
    need(t.lr > 0, "train.lr", "must be positive")
    need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    need(cfg.eval.every_tokens > 0, "eval.every_tokens", "must be positive")
    need(cfg.checkpoint.every_tokens > 0, "checkpoint.every_tokens", "must be positive")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    need(cfg.data.shard_tokens > 0, "data.shard_tokens", "must be positive")
    if cfg.data.source == "text":
        need(bool(cfg.data.paths), "data.paths", "the text source needs at least one file or folder")
    if cfg.data.source == "hf":
        need(bool(cfg.data.hf_path), "data.hf_path", "the hf source needs a dataset name or local path")
    if cfg.tokenizer.path is None:
        need(cfg.tokenizer.vocab_size >= 260, "tokenizer.vocab_size", "must be at least 260 (256 bytes + specials)")
    c, sae = cfg.concept, cfg.sae
    need(0 < c.insert_layer < m.n_layer, "concept.insert_layer",
         f"{c.insert_layer} must be between 1 and model.n_layer-1={m.n_layer - 1}")
    need(c.k_attr > 0, "concept.k_attr", "must be positive")
    need(0 < c.k <= sae.n_latents, "concept.k", f"must be in [1, sae.n_latents={sae.n_latents}]")
    need(c.lam >= 0, "concept.lam", "must be >= 0")
    need(sae.layer >= 0, "sae.layer", "must be >= 0")
    need(0 < sae.k <= sae.n_latents, "sae.k", f"must be in [1, sae.n_latents={sae.n_latents}]")
    need(c.k_attr <= sae.k or c.scoring == "attribution_preact", "concept.k_attr",
         f"{c.k_attr} labels cannot come from sae.k={sae.k} active latents")
    need(cfg.kd.temperature > 0, "kd.temperature", "must be positive")
    ip = cfg.interpret
    for key in ("describe_tokens", "contexts", "top_tokens", "match_tokens"):
        need(getattr(ip, key) > 0, f"interpret.{key}", "must be positive")
    for key in ("context_before", "context_after"):
        need(getattr(ip, key) >= 0, f"interpret.{key}", "must be >= 0")
    for i, name in enumerate(cfg.dag.ablation_scales or []):
        need(name in cfg.scales, f"dag.ablation_scales[{i}]", f"{name!r} is not defined under 'scales' ({sorted(cfg.scales)})")
    for i, name in enumerate(cfg.dag.scales):
        need(name in cfg.scales, f"dag.scales[{i}]", f"{name!r} is not defined under 'scales' ({sorted(cfg.scales)})")
    for i, name in enumerate(cfg.dag.methods):
        need(name in KNOWN_METHODS, f"dag.methods[{i}]", f"expected one of {list(KNOWN_METHODS)}, got {name!r}")
    for method, per_scale in cfg.method_overrides.items():
        need(method in KNOWN_METHODS, f"method_overrides.{method}", f"expected one of {list(KNOWN_METHODS)}")
        for scale in per_scale:
            need(scale in cfg.scales or scale == "base", f"method_overrides.{method}.{scale}",
                 f"not 'base' nor a scale under 'scales' ({sorted(cfg.scales)})")
    if cfg.scale is not None:
        need(cfg.scale in cfg.scales, "scale", f"{cfg.scale!r} is not defined under 'scales' ({sorted(cfg.scales)})")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults), apply the selected scale and CLI overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
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
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
