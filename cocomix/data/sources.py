"""Document sources: each yields `Doc`s tagged with a train/val split.

Splits are made *by document* (never by token), so no validation text leaks into training.
For `synthetic` and `text` the assignment is a seeded Bernoulli(val_fraction) draw per
document, in stream order, with a one-document lookahead that guarantees at least one train
and one val document. For `hf` it is the paper's OpenWebText recipe,
`ds.train_test_split(test_size=val_fraction, seed=split_seed)` with "test" used as val.

Everything streams: a 40 GB corpus never has to fit in memory.

A `text` corpus file that is not text (it does not decode strictly in `data.encoding`, or it
holds NUL bytes: a binary file) is never tokenised: up to `data.max_bad_files` such files are
skipped and reported (`iter_documents(..., skipped=[])`, the manifest's `skipped_files`), one more
is a DataError naming the first.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import DataConfig
from .errors import DataError
from .synthetic import SyntheticDoc, SyntheticLanguage

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclass
class Doc:
    text: str
    split: str  # "train" or "val"
    synthetic: SyntheticDoc | None = None  # word-level concept annotations (synthetic source)


# --------------------------------------------------------------------------------------
# Split assignment
# --------------------------------------------------------------------------------------


def assign_splits(texts: Iterable, val_fraction: float, seed: int) -> Iterator[tuple[object, str]]:
    """Tag each item "train"/"val" with a seeded draw; guarantee one of each if >= 2 items.

    The guarantee needs to know the stream has ended, so the last item is held back: if the
    stream produced no val (or no train) item so far, the last one is flipped.
    """
    rng = np.random.default_rng([seed, 7])
    draws = np.empty(0)
    seen = {"train": 0, "val": 0}
    pending = None
    i = 0
    for item in texts:
        if i % 4096 == 0:  # draw in bulk; consumption order is fixed, so this stays deterministic
            draws = rng.random(4096)
        split = "val" if draws[i % 4096] < val_fraction else "train"
        i += 1
        if pending is not None:
            seen[pending[1]] += 1
            yield pending
        pending = (item, split)
    if pending is not None:
        item, split = pending
        if i >= 2 and seen["val"] == 0:
            split = "val"
        elif i >= 2 and seen["train"] == 0:
            split = "train"
        yield item, split


# --------------------------------------------------------------------------------------
# Project Gutenberg licence stripping
# --------------------------------------------------------------------------------------

# Lenient on purpose: spacing and asterisks vary across eras of Gutenberg files, and older files
# end their licence header with "*END*THE SMALL PRINT! ..." instead of a START line.
_GUTENBERG_START = re.compile(r"^\s*\*+\s*START\s+OF\b|^\s*\*END\*\s*THE SMALL PRINT", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*\*+\s*END\s+OF\s+(THE|THIS)\s+PROJECT\s+GUTENBERG|^\s*End\s+of\s+(the\s+)?Project\s+Gutenberg",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Keep only the body of a Gutenberg book: after the START line, before the END line.

    Without a start marker the text is kept from the beginning; without an end marker, to the end.
    """
    start = 0
    for m in _GUTENBERG_START.finditer(text, 0, min(len(text), 100_000)):
        nl = text.find("\n", m.end())
        start = len(text) if nl < 0 else nl + 1  # the last marker in the header wins
    end_m = _GUTENBERG_END.search(text, start)
    end = end_m.start() if end_m else len(text)
    return text[start:end].strip("\n") + "\n"


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def _list_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p}: not found (expected a .txt/.jsonl/.parquet file or a folder of them)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_EXTENSIONS)
            if not found:
                raise DataError(f"data path {p}: folder has no .txt/.jsonl/.parquet files")
            files.extend(found)
        elif p.suffix.lower() in TEXT_EXTENSIONS:
            files.append(p)
        else:
            raise DataError(f"data path {p}: unknown extension '{p.suffix}' (expected .txt, .jsonl or .parquet)")
    return files


def _read_field(row: object, field: str, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        raise DataError(f"{where}: expected an object with a string field '{field}' (set data.text_field)")
    return row[field]


class _NotText(Exception):
    """A corpus file that is not text (`reason` says why); raised before it yields a document."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _codec(data: DataConfig) -> tuple[str, str]:
    """(the codec of `data.encoding`, its name in messages)."""
    name = codecs.lookup(data.encoding).name
    return ("utf-8", "UTF-8") if name in ("utf-8", "utf-8-sig") else (name, data.encoding)


def _decode(raw: bytes, codec: tuple[str, str], first: bool = True) -> str:
    """`raw` decoded strictly, or _NotText: bytes that do not decode, or NUL bytes (binary). A
    UTF-8 byte-order mark at the start of a file (`first`) is dropped."""
    skip = len(codecs.BOM_UTF8) if first and codec[0] == "utf-8" and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = (raw[skip:] if skip else raw).decode(codec[0])
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise _NotText(f"not {codec[1]} text: invalid byte 0x{raw[at]:02x} at offset {at}") from None
    if "\0" in text:
        raise _NotText("contains NUL bytes (a binary file?)")
    return text


def _iter_file(path: Path, data: DataConfig) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _decode(path.read_bytes(), _codec(data))
    elif suffix == ".jsonl":
        # Binary lines, each decoded strictly (data.encoding is ASCII-compatible: b"\n" ends a line).
        # Bad bytes before the first document make the file not text; later ones are an error at
        # their line, as the file's earlier documents are already out.
        codec = _codec(data)
        with path.open("rb") as f:
            yielded = False
            for lineno, raw in enumerate(f, 1):
                try:
                    line = _decode(raw, codec, first=lineno == 1)
                except _NotText as e:
                    if not yielded:
                        raise
                    raise DataError(f"{path}:{lineno}: {e.reason} (earlier lines are text: fix or remove the file)") from None
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{lineno}: not valid JSON (expected one object per line)") from None
                    yielded = True
                    yield _read_field(row, data.text_field, f"{path}:{lineno}")
    else:  # parquet, one row group at a time so memory stays bounded
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _NotText(f"not a Parquet file ({msg})") from None
        if data.text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column '{data.text_field}' (columns: {pf.schema_arrow.names}; set data.text_field)")
        kind = pf.schema_arrow.field(data.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column '{data.text_field}' holds {kind}, expected strings (set data.text_field)")
        for batch in pf.iter_batches(batch_size=1024, columns=[data.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def _clean(text: str, data: DataConfig) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text) if data.strip_gutenberg else text


def _skip_hint(reason: str, data: DataConfig) -> str:
    """What to do about a file that is not text."""
    hint = "remove it from data.paths"
    if reason.startswith(f"not {_codec(data)[1]} text"):
        hint += ", set data.encoding if the corpus is text in another encoding (e.g. cp1252)"
    return f"{hint}, or let data.max_bad_files (now {data.max_bad_files}) skip it"


def _text_docs(data: DataConfig, skipped: list[dict[str, str]]) -> Iterator[str]:
    for path in _list_files(data.paths):
        try:
            for text in _iter_file(path, data):
                text = _clean(text, data)
                if text.strip():
                    yield text
        except _NotText as e:  # raised before the file yielded anything
            skipped.append({"path": str(path), "reason": e.reason})
            if len(skipped) > data.max_bad_files:
                first = skipped[0]
                if len(skipped) == 1:
                    raise DataError(f"{first['path']}: {first['reason']}; {_skip_hint(first['reason'], data)}") from None
                raise DataError(
                    f"data.paths: {len(skipped)} files are not text, more than data.max_bad_files "
                    f"({data.max_bad_files}); the first: {first['path']}: {first['reason']}"
                ) from None


def _limit(it: Iterable, n: int | None) -> Iterator:
    for i, x in enumerate(it):
        if n is not None and i >= n:
            return
        yield x


def _hf_docs(data: DataConfig) -> Iterator[Doc]:
    import datasets

    path = data.hf_path
    kwargs = {k: v for k, v in (("data_files", data.hf_data_files or None), ("revision", data.hf_revision)) if v}
    try:
        saved = path and any((Path(path) / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))
        if saved:
            ds = datasets.load_from_disk(path)  # a save_to_disk folder
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[data.hf_split]
        elif data.hf_streaming:
            yield from _hf_stream(datasets.load_dataset(path, data.hf_name, split=data.hf_split, streaming=True,
                                                        **kwargs), data)
            return
        else:
            ds = datasets.load_dataset(path, data.hf_name, split=data.hf_split, **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the one-line contract
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"hf dataset {path!r} (name={data.hf_name!r}, split={data.hf_split!r}): could not load: {msg}") from None
    if data.text_field not in ds.column_names:
        raise DataError(f"hf dataset {path!r}: no column '{data.text_field}' (columns: {ds.column_names}; set data.text_field)")
    if data.max_docs is not None:
        ds = ds.select(range(min(data.max_docs, len(ds))))
    if len(ds) < 2:
        raise DataError(f"hf dataset {path!r}: expected at least 2 documents, found {len(ds)}")
    parts = ds.train_test_split(test_size=data.val_fraction, seed=data.split_seed)
    for name, split in (("train", "train"), ("test", "val")):
        part = parts[name].select_columns([data.text_field])
        for batch in part.iter(batch_size=1024):
            for text in batch[data.text_field]:
                if text:
                    yield Doc(_clean(text, data), split)


def _hf_stream(ds, data: DataConfig) -> Iterator[Doc]:
    """A streamed dataset's documents, split by a seeded draw per document (`assign_splits`)."""
    def texts():
        for i, row in enumerate(ds):
            if data.text_field not in row:
                raise DataError(f"hf dataset {data.hf_path!r}: no column '{data.text_field}' (columns: "
                                f"{sorted(row)}; set data.text_field)")
            yield row[data.text_field]

    for text, split in assign_splits(_limit(texts(), data.max_docs), data.val_fraction, data.split_seed):
        if text:
            yield Doc(_clean(text, data), split)


def iter_documents(data: DataConfig, split: str | None = None,
                   skipped: list[dict[str, str]] | None = None) -> Iterator[Doc]:
    """Yield the documents of `data` (all, or only one split), deterministically.

    Raises DataError (one line) for a missing path, an empty folder, an unknown extension, more
    files that are not text than `data.max_bad_files`, or a corpus without documents. Each skipped
    file (`text` source) is appended to `skipped` as {"path", "reason"}; skipping happens before
    the split draw, so the splits are those of the corpus without the skipped files.
    """
    skipped = [] if skipped is None else skipped
    if data.source == "synthetic":
        lang = SyntheticLanguage(data.synthetic)
        items = _limit(lang.documents(), data.max_docs)
        docs = (Doc(d.text, s, d) for d, s in assign_splits(items, data.val_fraction, data.split_seed))
    elif data.source == "text":
        if not data.paths:
            raise DataError("data.paths: empty (the text source needs at least one file or folder)")
        items = _limit(_text_docs(data, skipped), data.max_docs)
        docs = (Doc(t, s) for t, s in assign_splits(items, data.val_fraction, data.split_seed))
    elif data.source == "hf":
        docs = _hf_docs(data)
    else:
        raise DataError(f"data.source: unknown source {data.source!r} (expected synthetic, text or hf)")

    n = 0
    for doc in docs:
        n += 1
        if split is None or doc.split == split:
            yield doc
    if n == 0:
        where = ", ".join(data.paths) if data.source == "text" else (data.hf_path or data.source)
        also = f"; {len(skipped)} files skipped as not text, the first: {skipped[0]['path']}" if skipped else ""
        raise DataError(f"data source {where}: no documents found (expected non-empty text){also}")
