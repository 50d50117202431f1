"""Tokenizers: train a byte-level BPE on the corpus, or load an existing folder.

Byte-level BPE (as in GPT-2) never produces unknown tokens, so any text round-trips. The single
special token `<|endoftext|>` separates documents and doubles as bos/unk/pad.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from ..files import atomic_write_text, read_json, sha256_text
from .errors import DataError

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int | None = None):
    """Train a byte-level BPE on `texts` (streamed, at most `max_chars` characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def capped() -> Iterator[str]:
        used = 0
        for t in texts:
            if max_chars is not None and used + len(t) > max_chars:
                if used < max_chars:
                    yield t[: max_chars - used]
                return
            used += len(t)
            yield t

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(capped(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder. A missing folder is an error at once, never a hub id lookup."""
    p = Path(path)
    has_files = (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()
    if not p.is_dir() or not has_files:
        raise DataError(f"tokenizer folder {p}: not found (expected a folder with tokenizer.json)")
    from transformers import AutoTokenizer

    if (p / "tokenizer.json").is_file():
        read_json(p / "tokenizer.json")  # a damaged file: one line naming it, not the tokenizers library's error
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # the tokenizers library raises plain Exception
        raise DataError(f"tokenizer folder {p}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer folder {p}: has no eos token (expected e.g. {EOS})")
    return tok


def set_model_max_length(folder: str | Path, n_positions: int) -> None:
    """Record the model's context as a saved tokenizer's `model_max_length` (tokenizer_config.json).

    A tokenizer trained here knows no model and saves transformers' "unbounded" 1e30; a checkpoint's
    or an exported model's copy says how many tokens the model takes, so `tokenizer(..., truncation=True)`
    and pipelines stop at the context. Only that one field changes (tokenizer.json, hashed to match
    shards to their tokenizer, is untouched)."""
    path = Path(folder) / "tokenizer_config.json"
    try:
        config = read_json(path)
    except FileNotFoundError:
        config = {}
    config["model_max_length"] = int(n_positions)
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _canonical_hash(tokenizer_json: str) -> str:
    spec = json.loads(tokenizer_json)  # from a tokenizer object, or read_json's output: valid JSON
    # Padding/truncation settings do not change token ids and may be touched on load; ignore them.
    spec.pop("padding", None)
    spec.pop("truncation", None)
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_text(blob)


def tokenizer_hash(tok_or_dir) -> str:
    """sha256 of the canonical tokenizer.json content of a tokenizer object or folder."""
    if isinstance(tok_or_dir, (str, Path)):
        f = Path(tok_or_dir) / "tokenizer.json"
        if not f.is_file():
            raise DataError(f"tokenizer folder {tok_or_dir}: no tokenizer.json")
        return _canonical_hash(json.dumps(read_json(f)))  # one line naming the file if it is damaged
    backend = getattr(tok_or_dir, "backend_tokenizer", tok_or_dir)  # HF wrapper or raw tokenizers.Tokenizer
    return _canonical_hash(backend.to_str())
