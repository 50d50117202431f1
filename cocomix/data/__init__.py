"""The data pipeline: corpus sources -> tokenizer -> token shards -> blocks for training.

    prepare_data(cfg)                       tokenise cfg.data into cfg.data_dir (idempotent)
    TokenBlocks(data_dir, split, block_size) non-overlapping blocks, memory-mapped
    BlockOrder(n_blocks, seed).take(pos, n)  the seeded, resumable training order

See `shards.py` for the on-disk format and `synthetic.py` for the default corpus.
"""

from .errors import DataError
from .shards import (
    BlockOrder,
    TokenBlocks,
    check_tokenizer_matches,
    load_concepts,
    load_manifest,
    prepare_data,
)
from .sources import Doc, iter_documents, strip_gutenberg
from .synthetic import SyntheticLanguage
from .tokenizer import load_tokenizer, tokenizer_hash, train_bpe

__all__ = [
    "BlockOrder",
    "DataError",
    "Doc",
    "SyntheticLanguage",
    "TokenBlocks",
    "check_tokenizer_matches",
    "iter_documents",
    "load_concepts",
    "load_manifest",
    "load_tokenizer",
    "prepare_data",
    "strip_gutenberg",
    "tokenizer_hash",
    "train_bpe",
]
