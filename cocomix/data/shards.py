"""Tokenised shards on disk, and the views the trainer reads them through.

Layout of a data folder (`cfg.data_dir`):

    tokenizer/                  HF tokenizer folder (AutoTokenizer.from_pretrained works on it)
    train_000.bin ...           flat little-endian token ids (uint16, or uint32 for vocabs > 65535);
    val_000.bin ...             each document is followed by one EOS token
    train_000.concepts.bin ...  synthetic source only: uint16 (n_tokens, n_slots), row-major,
                                the ground-truth concepts of each token (EOS -> 0)
    concepts.json               synthetic source only: what every concept id means
    manifest.json               written LAST: sizes and sha256 of every shard, the data config,
                                the tokenizer hash, the corpus files skipped as not text
                                (`skipped_files`). No manifest = not a finished data folder.
    manifest.verified.json      written by `load_manifest(verify=True)` after the shards' sha256
                                matched: lets later loads skip the hashing (see `load_manifest`)

Everything streams (documents are encoded in batches and appended to the open shard), so memory
stays bounded whatever the corpus size. Files are written into a temporary folder and moved in
place at the end, so an interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, DataConfig
from ..files import atomic_write_json, file_identity, read_json, sha256_file, sha256_json, write_failure
from ..progress import Reporter, si
from .errors import DataError
from .sources import iter_documents
from .synthetic import N_SLOTS, SLOT_NAMES, SyntheticDoc, SyntheticLanguage
from .tokenizer import load_tokenizer, tokenizer_hash, train_bpe

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "manifest.verified.json"  # the verification stamp (see load_manifest)
STAMP_VERSION = 1
SPLITS = ("train", "val")
_OUTPUT_NAME = re.compile(r"^(train|val)_\d+(\.concepts)?\.bin$")
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_CHARS = 4_000_000
_LINE_EVERY_S = 30.0  # seconds between plain progress lines of tokenizing
_SKIPPED_LISTED = 100  # skipped corpus files named in the manifest (all are counted)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _HashedFile:
    """A file written under `<name>` inside the temporary folder, hashing as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.f = path.open("wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, arr: np.ndarray) -> None:
        b = arr.tobytes()
        self.f.write(b)
        self.sha.update(b)
        self.bytes += len(b)

    def close(self) -> dict[str, Any]:
        self.f.close()
        return {"file": self.path.name, "bytes": self.bytes, "sha256": self.sha.hexdigest()}


class _ShardWriter:
    """Appends token ids (and aligned concepts) to `<split>_NNN.bin`, starting a new shard every
    `shard_tokens` tokens. Documents may straddle shards; blocks never do (see TokenBlocks)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, with_concepts: bool):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens, self.with_concepts = shard_tokens, with_concepts
        self.shards: list[dict[str, Any]] = []
        self.tok: _HashedFile | None = None
        self.con: _HashedFile | None = None
        self.n_in_shard = 0
        self.n_tokens = 0
        self.n_docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}"
        self.tok = _HashedFile(self.folder / f"{name}.bin")
        self.con = _HashedFile(self.folder / f"{name}.concepts.bin") if self.with_concepts else None
        self.n_in_shard = 0

    def _close_shard(self) -> None:
        entry = self.tok.close()
        entry["n_tokens"] = self.n_in_shard
        if self.con is not None:
            entry["concepts"] = self.con.close()
        self.shards.append(entry)
        self.tok = self.con = None

    def write_doc(self, ids: np.ndarray, concepts: np.ndarray | None) -> None:
        self.n_docs += 1
        self.n_tokens += len(ids)
        while len(ids):
            if self.tok is None:  # opened lazily so no empty shard is ever written
                self._open()
            take = min(len(ids), self.shard_tokens - self.n_in_shard)
            self.tok.write(ids[:take].astype(self.dtype, copy=False))
            if self.con is not None:
                self.con.write(np.ascontiguousarray(concepts[:take], dtype="<u2"))
                concepts = concepts[take:]
            ids = ids[take:]
            self.n_in_shard += take
            if self.n_in_shard == self.shard_tokens:
                self._close_shard()

    def finish(self) -> dict[str, Any]:
        if self.tok is not None:
            self._close_shard()
        return {"n_tokens": self.n_tokens, "n_docs": self.n_docs, "shards": self.shards}


def align_concepts(doc: SyntheticDoc, offsets: np.ndarray) -> np.ndarray:
    """Concepts of each BPE token: those of the word holding the token's last character.

    The last character (not the first) because byte-level BPE glues the preceding space onto a
    word's first token, and that space lies outside the word.
    """
    last_char = offsets[:, 1] - 1
    word = np.searchsorted(doc.word_ends, last_char, side="right")
    return doc.word_concepts[np.minimum(word, len(doc.word_ends) - 1)]


def _config_key(cfg: Config) -> dict[str, Any]:
    """What the data folder is a pure function of (compared to skip re-preparation)."""
    return {
        "format_version": FORMAT_VERSION,
        "data": dataclasses.asdict(cfg.data),
        "tokenizer_config": dataclasses.asdict(cfg.tokenizer),
    }


def _build(cfg: Config, tmp: Path, progress: bool) -> dict[str, Any]:
    """Write tokenizer, shards and concepts into `tmp`; return the manifest (not yet written)."""
    data = cfg.data
    tok = _make_tokenizer(cfg, tmp, progress)
    eos_id = int(tok.eos_token_id)
    vocab_size = len(tok)
    dtype = np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
    skipped: list[dict[str, str]] = []
    splits, max_id = _write_shards(data, tmp, tok.backend_tokenizer, eos_id, dtype, progress, skipped)
    if skipped:
        _warn_skipped(skipped, data)
    concepts_info = _write_concept_table(data, tmp) if data.source == "synthetic" else None
    return {
        **_config_key(cfg),
        "source": data.source,
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "max_token_id": max_id,
        "dtype": dtype.name,
        "splits": splits,
        "concepts": concepts_info,
        "skipped_files": {"count": len(skipped), "files": skipped[:_SKIPPED_LISTED]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _make_tokenizer(cfg: Config, tmp: Path, progress: bool):
    """Step 1: the tokenizer, trained on the training documents only (val stays unseen) or loaded,
    saved to `tmp/tokenizer`."""
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        print(f"training byte-level BPE (vocab {cfg.tokenizer.vocab_size}) on the training documents", flush=True)
        texts = (d.text for d in iter_documents(cfg.data, split="train"))
        tok = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.train_max_chars)
    tok.save_pretrained(str(tmp / "tokenizer"))
    return tok


def _warn_skipped(skipped: list[dict[str, str]], data: DataConfig) -> None:
    """One stderr line: how many corpus files were skipped as not text, the first few by name."""
    named = "; ".join(f"{f['path']} ({f['reason']})" for f in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    print(f"warning: skipped {len(skipped)} of data.paths' files as not text (data.max_bad_files: "
          f"{data.max_bad_files}; see skipped_files in manifest.json): {named}{more}", file=sys.stderr, flush=True)


def _write_shards(data: DataConfig, tmp: Path, backend, eos_id: int, dtype: np.dtype,
                  progress: bool, skipped: list | None = None) -> tuple[dict, int]:
    """Step 2: stream documents -> token ids -> shards, encoded in batches of documents; returns
    ({split: its shards}, the largest token id written). Corpus files skipped as not text are
    appended to `skipped`."""
    synthetic = data.source == "synthetic"
    writers = {s: _ShardWriter(tmp, s, dtype, data.shard_tokens, synthetic) for s in SPLITS}
    max_id = -1
    # The number of documents is unknown while streaming: a bar on a terminal, else a plain line
    # every `_LINE_EVERY_S` seconds and one at the end.
    reporter = Reporter(f"tokenizing {data.source}", None, "doc", progress, every_s=_LINE_EVERY_S)

    def report(final: bool = False) -> None:
        if reporter.due(final):
            tokens = sum(w.n_tokens for w in writers.values())
            rate = tokens / max(time.perf_counter() - reporter.started, 1e-9)
            reporter.line(f"tokenizing {data.source}: {reporter.done:,} docs {tokens:,} tokens {si(rate)} tok/s")

    def flush(batch: list) -> None:
        nonlocal max_id
        max_id = max(max_id, _encode_documents(batch, backend, eos_id, synthetic, writers))
        reporter.update(len(batch), tokens=sum(w.n_tokens for w in writers.values()))
        report()

    batch: list = []
    chars = 0
    for doc in iter_documents(data, skipped=skipped):
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)
    report(final=True)
    reporter.close()
    splits = {s: w.finish() for s, w in writers.items()}
    for s in SPLITS:
        if splits[s]["n_docs"] == 0:
            raise DataError(
                f"data source {data.source}: no {s} documents (expected at least 2 documents so both splits get one)"
            )
    return splits, max_id


def _encode_documents(batch: list, backend, eos_id: int, synthetic: bool, writers: dict) -> int:
    """Encode a batch of documents, each followed by EOS, into the writers of their splits (with
    each token's ground-truth concepts on the synthetic corpus); returns the largest token id."""
    max_id = -1
    encodings = backend.encode_batch([d.text for d in batch], add_special_tokens=False)
    for doc, enc in zip(batch, encodings):
        ids = np.array(enc.ids + [eos_id], dtype=np.int64)
        max_id = max(max_id, int(ids.max()))
        concepts = None
        if synthetic:
            concepts = np.zeros((len(ids), N_SLOTS), dtype=np.uint16)  # (n_tokens, n_slots); EOS row stays 0
            if len(enc.ids):
                concepts[:-1] = align_concepts(doc.synthetic, np.asarray(enc.offsets, dtype=np.int64))
        writers[doc.split].write_doc(ids, concepts)
    return max_id


def _write_concept_table(data: DataConfig, tmp: Path) -> dict[str, Any]:
    """Synthetic source: `concepts.json`, what every concept id means; returns its manifest entry."""
    table = SyntheticLanguage(data.synthetic).concept_table()
    (tmp / "concepts.json").write_text(json.dumps(table, indent=1))
    return {
        "file": "concepts.json",
        "n_slots": N_SLOTS,
        "slot_names": list(SLOT_NAMES),
        "n_concepts": table["n_concepts"],
        "dtype": "uint16",
    }


def prepare_data(cfg: Config, progress: bool = True, force: bool = False) -> Path:
    """Tokenise the corpus of `cfg.data` into `cfg.data_dir` and return that folder.

    Skips the work (quickly) if the folder already holds a valid manifest for the same data and
    tokenizer config, unless `force`.
    """
    out = Path(cfg.data_dir)
    key = _config_key(cfg)
    if not force and (out / MANIFEST).is_file():
        try:
            m = load_manifest(out, verify="size")
            if all(m.get(k) == v for k, v in key.items()):
                return out
        except DataError:
            pass  # stale or damaged: rebuild

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".prepare.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # leftovers of an interrupted run
    tmp.mkdir()
    try:
        manifest = _build(cfg, tmp, progress)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, if any, is untouched
        failure = write_failure(e, tmp, "the data folder is as it was before", what=f"the shards of {out}")
        if failure is None:
            raise
        raise failure from None

    # Swap in: first invalidate the old folder (manifest), then replace outputs, manifest last.
    (out / MANIFEST).unlink(missing_ok=True)
    (out / VERIFIED).unlink(missing_ok=True)  # vouched for the old manifest only
    for p in out.iterdir():
        if _OUTPUT_NAME.match(p.name) or p.name == "concepts.json":
            p.unlink()
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    for p in tmp.iterdir():
        os.replace(p, out / p.name)
    tmp.rmdir()
    atomic_write_json(out / MANIFEST, manifest, indent=1)  # last: its presence means complete
    return out


# --------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------


def _verify_file(data_dir: Path, entry: dict[str, Any], check_sha: bool,
                 trusted: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Check one file against its manifest entry (size; sha256 if `check_sha`).

    `trusted`: the stamp's records ({file name: record}); a file whose record matches its current
    size, mtime, ctime and inode and the manifest's sha256 is not hashed again. Returns the file's
    record for the next stamp when its sha256 is known good (None otherwise, e.g. when the file
    changed while it was being hashed).
    """
    path = data_dir / entry["file"]
    if not path.is_file():
        raise DataError(f"shard {path}: missing (listed in {data_dir / MANIFEST}; re-run `cocomix prepare-data`)")
    st = path.stat()
    if st.st_size != entry["bytes"]:
        raise DataError(f"shard {path}: size mismatch (expected {entry['bytes']} bytes, got {st.st_size})")
    if not check_sha:
        return None
    record = {**file_identity(st), "sha256": entry["sha256"]}
    if trusted is not None and trusted.get(entry["file"]) == record:
        return record  # unchanged since its sha256 matched
    got = sha256_file(path)
    if got != entry["sha256"]:
        raise DataError(f"shard {path}: sha256 mismatch (expected {entry['sha256']}, got {got})")
    return record if file_identity(path.stat()) == file_identity(st) else None  # changed while hashed: vouch for nothing


def _read_stamp(data_dir: Path, manifest_sha: str) -> dict[str, Any]:
    """The records of the verification stamp if it is intact and was made for this very manifest
    (same sha256 of its bytes); {} otherwise. Whatever is wrong with the file (absent, unreadable,
    half-written, garbage, another version) means "no stamp": the shards are hashed again."""
    try:
        stamp = read_json(data_dir / VERIFIED)
        body = {k: v for k, v in stamp.items() if k != "checksum"}
        if (stamp["checksum"] == sha256_json(body) and body["stamp_version"] == STAMP_VERSION
                and body["manifest_sha256"] == manifest_sha and isinstance(body["files"], dict)):
            return body["files"]
    except Exception:  # noqa: BLE001 - any damage to the stamp only costs a re-hash
        pass
    return {}


def _write_stamp(data_dir: Path, manifest_sha: str, records: dict[str, Any]) -> None:
    """Record that these files' sha256 matched the manifest; atomic (concurrent jobs just replace
    each other's equivalent stamps). A folder we cannot write to (read-only) only costs a warning."""
    body = {
        "stamp_version": STAMP_VERSION,
        "manifest_sha256": manifest_sha,
        "verified": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": records,
    }
    path = data_dir / VERIFIED
    try:
        # The checksum catches what atomic replace alone cannot, e.g. two hosts of a shared file
        # system writing the same temporary name at once.
        atomic_write_json(path, {**body, "checksum": sha256_json(body)}, indent=1)
    except OSError as e:
        warnings.warn(f"{path}: could not record the shard verification ({e.strerror or e}); "
                      "the shards will be hashed again at the next start", stacklevel=3)


def load_manifest(data_dir: str | Path, verify: bool | str = True, splits: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read `manifest.json`; with `verify` check every shard's size (and sha256), or only those of
    `splits` (a tuning trial never opens the validation split: `eval.split: tune`).

    verify: True (size + sha256, hashing only files changed since their last verification),
    "full" (size + sha256 of every file, ignoring the stamp), "size" (size only) or False.

    Hashes are verified once per data folder, not once per job: after the shards' sha256 match,
    `manifest.verified.json` records, for each file, its size, mtime_ns, ctime_ns, inode and the
    sha256 that matched, plus the sha256 of the manifest itself. A later `verify=True` hashes only
    the files whose record no longer matches (rewritten, touched, replaced, copied elsewhere);
    a changed manifest, or a stamp that is absent, unreadable or damaged, means hashing everything.
    A mismatch raises the usual one-line DataError naming the file.

    The stamp's stated limit (the rule of make and rsync, plus ctime and inode): a change to a
    file's bytes that keeps its size, mtime, ctime and inode cannot be seen without hashing (e.g.
    a file system that does not maintain ctime, a clock set back, a write within the same
    timestamp tick as the verification, or damage below the file system such as bit rot). Use
    verify="full" to hash everything regardless (`cocomix prepare-data --force` rebuilds).
    """
    if verify not in (True, False, "size", "full"):
        raise ValueError(f"verify={verify!r}: expected True, False, 'size' or 'full'")
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found (expected a prepared data folder; run `cocomix prepare-data` first)")
    raw = path.read_bytes()
    try:
        m = json.loads(raw)
    except ValueError as e:  # JSONDecodeError or bytes that are not UTF-8
        raise DataError(f"{path}: not valid JSON ({e}); re-run `cocomix prepare-data`") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; re-run `cocomix prepare-data`")
    if verify:
        check_sha = verify != "size"
        manifest_sha = hashlib.sha256(raw).hexdigest()
        trusted = _read_stamp(data_dir, manifest_sha) if verify is True else None
        records: dict[str, Any] = {}
        for name, split in m["splits"].items():
            if splits is not None and name not in splits:  # unread: its stamp records stay as they were
                records.update({e["file"]: trusted[e["file"]] for shard in split["shards"]
                                for e in (shard, shard.get("concepts")) if e is not None and trusted and e["file"] in trusted})
                continue
            for shard in split["shards"]:
                for entry in (shard, shard.get("concepts")):
                    if entry is not None:
                        record = _verify_file(data_dir, entry, check_sha, trusted)
                        if record is not None:
                            records[entry["file"]] = record
        if check_sha and records != trusted:
            _write_stamp(data_dir, manifest_sha, records)
    return m


def load_concepts(data_dir: str | Path) -> dict[str, Any]:
    """The `concepts.json` of a synthetic data folder (what each concept id means)."""
    path = Path(data_dir) / "concepts.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (only the synthetic source has ground-truth concepts)")
    return read_json(path)


def check_tokenizer_matches(data_dir: str | Path, tokenizer_dir_or_hash, model_vocab_size: int | None = None) -> None:
    """Raise DataError unless the tokenizer is the one the shards were made with and fits the model.

    `tokenizer_dir_or_hash`: a tokenizer folder, a sha256 hex string, or a tokenizer object.
    """
    m = load_manifest(data_dir, verify=False)
    t = tokenizer_dir_or_hash
    if isinstance(t, str) and re.fullmatch(r"[0-9a-f]{64}", t):
        h, what = t, f"tokenizer hash {t[:12]}"
    elif isinstance(t, (str, Path)):
        h, what = tokenizer_hash(t), f"tokenizer {t}"
    else:
        h, what = tokenizer_hash(t), "tokenizer object"
    if h != m["tokenizer_hash"]:
        raise DataError(
            f"{what} (sha256 {h[:12]}) does not match the tokenizer of {data_dir} "
            f"(sha256 {m['tokenizer_hash'][:12]}); use {Path(data_dir) / 'tokenizer'} or re-run `cocomix prepare-data`"
        )
    if model_vocab_size is not None and (m["vocab_size"] > model_vocab_size or m["max_token_id"] >= model_vocab_size):
        raise DataError(
            f"{Path(data_dir) / MANIFEST}: tokenizer vocab {m['vocab_size']} (max token id {m['max_token_id']}) "
            f"exceeds the model vocab_size {model_vocab_size}"
        )


class TokenBlocks:
    """Fixed, non-overlapping blocks of `block_size` tokens over one split's shards (memory-mapped).

    Blocks never cross shard boundaries; a shard's tail shorter than a block is dropped. Blocks
    may span document boundaries (the EOS token marks them), as in nanoGPT.
    """

    offset = 0  # block i is block i of `split` (see BlockRange)

    def __init__(self, data_dir: str | Path, split: str, block_size: int, verify: bool | str = "size"):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir, verify=verify)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.data_dir / MANIFEST}: no split {split!r} (expected one of {list(self.manifest['splits'])})")
        if block_size < 1:
            raise DataError(f"block_size {block_size}: expected a positive number of tokens")
        self.split, self.block_size = split, block_size
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["splits"][split]["shards"]
        self._tokens = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self._concepts = None
        if self.manifest.get("concepts"):
            n_slots = self.manifest["concepts"]["n_slots"]
            self._concepts = [
                np.memmap(self.data_dir / s["concepts"]["file"], dtype="<u2", mode="r").reshape(-1, n_slots) for s in shards
            ]
        per_shard = [len(t) // block_size for t in self._tokens]
        self._first = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)  # first block of each shard

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def has_concepts(self) -> bool:
        return self._concepts is not None

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks ({self.split})")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        return s, (i - int(self._first[s])) * self.block_size

    def __getitem__(self, i: int) -> np.ndarray:
        s, off = self._locate(int(i))
        return np.asarray(self._tokens[s][off : off + self.block_size])

    def get_batch(self, indices):
        """Blocks `indices` as a torch.LongTensor of shape (n, block_size)."""
        import torch

        return torch.from_numpy(np.stack([self[i].astype(np.int64) for i in indices]))

    def get_concepts(self, indices) -> np.ndarray:
        """Ground-truth concepts of blocks `indices`: int64 (n, block_size, n_slots) (synthetic only)."""
        if self._concepts is None:
            raise DataError(f"{self.data_dir}: no concept shards (only the synthetic source has them)")
        out = []
        for i in indices:
            s, off = self._locate(int(i))
            out.append(np.asarray(self._concepts[s][off : off + self.block_size], dtype=np.int64))
        return np.stack(out)

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the split's unigram token distribution: the loss of a model
        that ignores context, so a trained model's held-out loss should be well below it."""
        counts = np.zeros(self.manifest["vocab_size"], dtype=np.int64)
        for t in self._tokens:
            for a in range(0, len(t), 1 << 24):  # chunked: bounded memory on huge shards
                counts += np.bincount(t[a : a + (1 << 24)], minlength=len(counts))[: len(counts)]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class BlockOrder:
    """The order in which training visits blocks: a fresh seeded permutation every epoch.

    Epoch e uses `np.random.default_rng([seed, e]).permutation(n_blocks)`. The stream is a pure
    function of (n_blocks, seed), so a checkpoint only needs the position to resume exactly, and
    every method trained with the same seed sees the same data in the same order.
    """

    def __init__(self, n_blocks: int, seed: int):
        if n_blocks < 1:
            raise DataError(f"BlockOrder: expected at least one block, got {n_blocks} (corpus too small for block_size?)")
        self.n_blocks, self.seed = n_blocks, seed
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks))
        return self._cache[1]

    def take(self, position: int, count: int) -> np.ndarray:
        """Block indices at order positions [position, position + count), across epochs."""
        out = []
        while count > 0:
            epoch, off = divmod(position, self.n_blocks)
            chunk = self.permutation(epoch)[off : off + count]
            out.append(chunk)
            position += len(chunk)
            count -= len(chunk)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


class BlockRange:
    """Blocks [start, stop) of a `TokenBlocks`, numbered from 0: the tuning split and the training blocks
    before it (`eval.split: tune`). `split` and `offset` place them in the underlying split, where a
    label cache indexes them (block i here is block offset + i of `split`)."""

    def __init__(self, blocks: TokenBlocks, start: int, stop: int):
        if not 0 <= start <= stop <= len(blocks):
            raise IndexError(f"blocks {start}..{stop} out of range for {len(blocks)} blocks ({blocks.split})")
        self.blocks, self.offset, self.stop = blocks, start, stop
        self.split, self.block_size, self.data_dir, self.manifest = blocks.split, blocks.block_size, blocks.data_dir, blocks.manifest

    def __len__(self) -> int:
        return self.stop - self.offset

    @property
    def has_concepts(self) -> bool:
        return self.blocks.has_concepts

    def _index(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        return idx + self.offset

    def __getitem__(self, i: int) -> np.ndarray:
        return self.blocks[int(self._index([i])[0])]

    def get_batch(self, indices):
        return self.blocks.get_batch(self._index(indices))

    def get_concepts(self, indices) -> np.ndarray:
        return self.blocks.get_concepts(self._index(indices))
