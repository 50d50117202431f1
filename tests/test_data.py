"""The data pipeline: synthetic language, sources, tokenizer, shards, blocks and order."""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cocomix.config import Config, ConfigError, DataConfig, SyntheticConfig, TokenizerConfig, load_config
from cocomix.data import (
    BlockOrder,
    DataError,
    SyntheticLanguage,
    TokenBlocks,
    check_tokenizer_matches,
    iter_documents,
    load_concepts,
    load_manifest,
    load_tokenizer,
    prepare_data,
    strip_gutenberg,
    tokenizer_hash,
    train_bpe,
)

GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "gutenberg_top100_authors_subset"


def _synthetic_cfg(data_dir: Path, **data_kw) -> Config:
    data = DataConfig(source="synthetic", dir=str(data_dir), synthetic=SyntheticConfig(n_tokens=50_000), **data_kw)
    return Config(data=data, tokenizer=TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def data_synth(tmp_path_factory):
    """A small synthetic data folder with several shards per split (shard_tokens is tiny)."""
    cfg = _synthetic_cfg(tmp_path_factory.mktemp("data_synth") / "data", shard_tokens=8_000, val_fraction=0.1)
    return cfg, prepare_data(cfg, progress=False)


def _read_split(data_dir: Path, split: str) -> np.ndarray:
    m = load_manifest(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2") for s in m["splits"][split]["shards"]])


# --------------------------------------------------------------------------------------
# Synthetic language
# --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed():
    def texts(seed):
        return [d.text for d in SyntheticLanguage(SyntheticConfig(seed=seed)).documents(20_000)]

    a, b, c = texts(1), texts(1), texts(2)
    assert a == b
    assert a != c
    assert sum(len(t.split()) for t in a) >= 20_000


def test_synthetic_generation_speed():
    lang = SyntheticLanguage(SyntheticConfig())
    t0 = time.perf_counter()
    n = sum(len(d.word_ends) for d in lang.documents(1_000_000))
    assert n >= 1_000_000
    assert time.perf_counter() - t0 < 30  # measured ~1 s on one core


def test_topics_shape_word_choice_across_the_document():
    """Topic words of a document mostly come from one topic, unlike a shuffled baseline."""
    lang = SyntheticLanguage(SyntheticConfig(n_tokens=100_000))
    docs = list(lang.documents())
    per_doc = [d.word_concepts[d.word_concepts[:, 0] > 0, 0] for d in docs]

    def majority_share(topic_lists):
        return np.mean([Counter(t.tolist()).most_common(1)[0][1] / len(t) for t in topic_lists if len(t)])

    rng = np.random.default_rng(0)
    pooled = rng.permutation(np.concatenate(per_doc))
    shuffled = np.split(pooled, np.cumsum([len(t) for t in per_doc])[:-1])
    real, base = majority_share(per_doc), majority_share(shuffled)
    assert real > 0.75, real  # 1-2 topics per doc, main topic weight 0.7
    assert base < 0.3, base  # 12 topics mixed at random


def test_one_word_pool_and_one_topic_per_document():
    """`parts_of_speech: false`: each topic's content words are one pool of `words_per_topic` words
    that fills noun, verb and adjective slots alike; `max_topics_per_doc: 1`: every topic word of a
    document belongs to one topic. The words of the concept table are the pool, each once."""
    cfg = SyntheticConfig(n_tokens=60_000, n_topics=6, words_per_topic=5, parts_of_speech=False, max_topics_per_doc=1)
    lang = SyntheticLanguage(cfg)
    table = lang.concept_table()
    topics = [c for c in table["concepts"] if c["kind"] == "topic"]
    assert [len(c["words"]) for c in topics] == [5] * 6
    assert all(c["nouns"] == c["verbs"] == c["adjectives"] == c["words"] for c in topics)
    assert len({w for c in topics for w in c["words"]}) == 30  # pools are disjoint
    pool = {c["id"]: set(c["words"]) for c in topics}
    docs = list(lang.documents())
    for d in docs:
        words = np.array(d.text.split())
        t = d.word_concepts[:, 0]
        assert len(set(t[t > 0].tolist())) == 1
        assert set(words[t > 0]) <= pool[int(t[t > 0][0])]
    # Every pool word turns up in every slot: nouns ('the ... .' ends), verbs and adjectives alike.
    after_the = Counter(w for d in docs for a, w in zip(d.text.split(), d.text.split()[1:]) if a == "the")
    assert set().union(*pool.values()) <= set(after_the)
    # The default language keeps two topics per document and three word lists per topic.
    default = SyntheticLanguage(SyntheticConfig(n_tokens=20_000, n_topics=6, words_per_topic=5))
    assert all(len(c["words"]) == 15 for c in default.concept_table()["concepts"] if c["kind"] == "topic")
    assert any(len(set(d.word_concepts[d.word_concepts[:, 0] > 0, 0].tolist())) == 2 for d in default.documents())


def test_max_topics_per_doc_is_checked():
    with pytest.raises(ConfigError, match=r"^config key 'data.synthetic.max_topics_per_doc': expected one of \[1, 2\], got 3$"):
        load_config(None, ["data.synthetic.max_topics_per_doc=3"])


def test_entity_profession_recurs_after_introduction():
    """'NAME the TITLE' introduces a profession; later 'NAME <word>' uses that profession's words."""
    lang = SyntheticLanguage(SyntheticConfig(n_tokens=100_000))
    table = lang.concept_table()
    profs = [c for c in table["concepts"] if c["kind"] == "profession"]
    title_of = {c["title"]: c["id"] for c in profs}
    word_prof = {w: c["id"] for c in profs for w in c["words"][1:]}
    names = set(table["entity_names"])
    checked = 0
    for doc in lang.documents():
        w = doc.text.split()
        known = {}
        for i in range(len(w) - 2):
            if w[i] in names and w[i + 1] == "the" and w[i + 2] in title_of:
                known[w[i]] = title_of[w[i + 2]]
            elif w[i] in names and w[i + 1] in word_prof:
                assert w[i] in known, "an entity is used before its introduction"
                assert word_prof[w[i + 1]] == known[w[i]]
                checked += 1
    assert checked > 500


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def test_bpe_trains_and_round_trips_any_text(tmp_path):
    texts = [d.text for d in SyntheticLanguage(SyntheticConfig(n_tokens=20_000)).documents()]
    tok = train_bpe(texts, vocab_size=300)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    for s in [texts[0], "Héllo wörld 🙂\n\n  tabs\tand CAPS!"]:
        assert tok.decode(tok.encode(s)) == s
    tok.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    assert tokenizer_hash(tok) == tokenizer_hash(tmp_path / "tok") == tokenizer_hash(again)
    assert again.encode(texts[1]) == tok.encode(texts[1])


def test_missing_tokenizer_folder_is_an_error_not_a_hub_id(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="gpt2-missing"):
        load_tokenizer(tmp_path / "gpt2-missing")
    assert time.perf_counter() - t0 < 2


# --------------------------------------------------------------------------------------
# Shards, manifest, blocks
# --------------------------------------------------------------------------------------


def test_shards_hold_every_document_plus_eos_split_by_document(data_synth):
    cfg, d = data_synth
    m = load_manifest(d)
    tok = load_tokenizer(d / "tokenizer")
    docs = list(iter_documents(cfg.data))
    for split in ("train", "val"):
        want = [doc.text for doc in docs if doc.split == split]
        ids = _read_split(d, split)
        assert m["splits"][split]["n_docs"] == len(want) >= 1
        assert m["splits"][split]["n_tokens"] == len(ids) == sum(len(tok.encode(t)) + 1 for t in want)
        # Cutting at EOS gives back exactly the split's documents, in order.
        cuts = np.flatnonzero(ids == m["eos_id"])
        assert len(cuts) == len(want) and cuts[-1] == len(ids) - 1
        got = [tok.decode(part) for part in np.split(ids, cuts + 1)[:-1]]
        assert [g.removesuffix("<|endoftext|>") for g in got] == want
    train_texts = {doc.text for doc in docs if doc.split == "train"}
    assert not train_texts & {doc.text for doc in docs if doc.split == "val"}
    assert len(m["splits"]["train"]["shards"]) > 3  # shard_tokens=8000 forces several
    assert all(s["n_tokens"] <= 8_000 for s in m["splits"]["train"]["shards"])
    assert m["dtype"] == "uint16" and m["tokenizer_hash"] == tokenizer_hash(d / "tokenizer")


def test_concept_shards_align_with_tokens(data_synth):
    """Every token carries the concepts the generator gave the word it is part of; EOS carries 0.

    Words are rebuilt from decoded tokens independently of the offsets used when writing.
    """
    _, d = data_synth
    table = load_concepts(d)
    n_topics = sum(c["kind"] == "topic" for c in table["concepts"])
    expected = {w: [0, 0] for w in table["concepts"][0]["words"]}
    for c in table["concepts"][1:]:
        for w in c["words"]:
            expected[w] = [c["id"], 0] if c["kind"] == "topic" else [0, c["id"]]
    names = set(table["entity_names"])
    tok = load_tokenizer(d / "tokenizer")
    blocks = TokenBlocks(d, "train", 256)
    ids = blocks.get_batch(range(8)).numpy().ravel()  # consecutive tokens of the first shard
    con = blocks.get_concepts(range(8)).reshape(-1, 2)
    eos = tok.eos_token_id
    # Group tokens into words: a word starts at a piece with a leading space, or right after EOS.
    words, cur = [], []
    for i, t in enumerate(ids):
        piece = tok.decode([int(t)])
        if t == eos or piece.startswith(" ") or (i > 0 and ids[i - 1] == eos):
            if cur:
                words.append(cur)
            cur = []
        if t == eos:
            assert con[i].tolist() == [0, 0]
        else:
            cur.append((i, piece))
    checked = Counter()
    for group in words[1:]:  # the first may begin before the block
        word = "".join(p for _, p in group).strip()
        for i, _ in group:
            if word in names:  # an entity name carries its profession in this document
                assert con[i, 0] == 0 and n_topics < con[i, 1] < table["n_concepts"], (word, con[i])
                checked["name"] += 1
            else:
                assert con[i].tolist() == expected[word], (word, con[i])
                checked["topic" if con[i, 0] else "profession" if con[i, 1] else "none"] += 1
    assert min(checked.values()) > 10 and len(checked) == 4, checked


def test_manifest_detects_corruption_truncation_and_absence(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "data")
    d = prepare_data(cfg, progress=False)
    shard = d / "train_000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    load_manifest(d, verify="size")  # same size: the fast check cannot see it
    with pytest.raises(DataError, match=r"train_000\.bin: sha256 mismatch"):
        load_manifest(d)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match=r"train_000\.bin: size mismatch"):
        load_manifest(d, verify="size")
    # A damaged folder is rebuilt (not skipped) by the next prepare_data.
    prepare_data(cfg, progress=False)
    load_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json.*prepare-data"):
        load_manifest(d)
    with pytest.raises(DataError, match="manifest.json"):
        TokenBlocks(d, "train", 16)


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the shard hashes load_manifest does: every file name passed to the module's sha256."""
    import cocomix.data.shards as shards

    calls = []
    real = shards.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(shards, "sha256_file", counting)
    return calls


def _n_files(m) -> int:
    return sum(1 + bool(s.get("concepts")) for split in m["splits"].values() for s in split["shards"])


def test_shard_hashes_are_verified_once_per_data_folder(tmp_path, hash_calls):
    d = prepare_data(_synthetic_cfg(tmp_path / "data", shard_tokens=20_000), progress=False)
    m = load_manifest(d)
    n = _n_files(m)
    assert n >= 4 and len(hash_calls) == n  # the first load hashes every file and records it
    stamp = json.loads((d / "manifest.verified.json").read_text())
    assert sorted(stamp["files"]) == sorted(set(hash_calls))
    hash_calls.clear()
    assert load_manifest(d) == m
    assert hash_calls == []  # the second load only stats
    # "full" hashes regardless; "size" and False never hash.
    load_manifest(d, verify="full")
    assert len(hash_calls) == n
    hash_calls.clear()
    load_manifest(d, verify="size"), load_manifest(d, verify=False)
    assert hash_calls == []
    with pytest.raises(ValueError, match="verify"):
        load_manifest(d, verify="sha")


def test_rewritten_shard_is_rehashed_despite_the_stamp(tmp_path, hash_calls):
    d = prepare_data(_synthetic_cfg(tmp_path / "data", shard_tokens=20_000), progress=False)
    load_manifest(d)
    shard = d / "train_000.bin"
    good = shard.read_bytes()
    st = shard.stat()
    bad = bytearray(good)
    bad[100] ^= 0xFF
    # Same size, new mtime: only this file is hashed again, and the one-line error names it.
    shard.write_bytes(bytes(bad))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hash_calls.clear()
    with pytest.raises(DataError, match=r"^shard \S*train_000\.bin: sha256 mismatch[^\n]*$"):
        load_manifest(d)
    assert hash_calls == ["train_000.bin"]
    with pytest.raises(DataError, match=r"train_000\.bin: sha256 mismatch"):
        load_manifest(d)  # a failure never records the bad file as good
    # Restored bytes are hashed once, then trusted again.
    shard.write_bytes(good)
    hash_calls.clear()
    load_manifest(d), load_manifest(d)
    assert hash_calls == ["train_000.bin"]
    # Same size AND the old mtime restored: the ctime still moves (it cannot be set), so the
    # change is seen where the file system keeps ctime; beyond that lies the stamp's stated limit.
    before = shard.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    shard.write_bytes(bytes(bad))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if after.st_ctime_ns == before.st_ctime_ns:
        pytest.skip("this file system did not move the ctime: undetectable without hashing (the stated limit)")
    with pytest.raises(DataError, match=r"train_000\.bin: sha256 mismatch"):
        load_manifest(d)


def test_changed_manifest_or_damaged_stamp_means_rehash(tmp_path, hash_calls):
    d = prepare_data(_synthetic_cfg(tmp_path / "data", shard_tokens=20_000), progress=False)
    n = _n_files(load_manifest(d))
    stamp = d / "manifest.verified.json"
    good_stamp = stamp.read_bytes()
    # A changed manifest (same shards, other bytes) invalidates the whole stamp.
    manifest = d / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")
    hash_calls.clear()
    load_manifest(d)
    assert len(hash_calls) == n
    hash_calls.clear()
    load_manifest(d)
    assert hash_calls == []  # re-stamped for the new manifest
    # Garbage, a half-written stamp, valid JSON of the wrong shape, or an edited record with a
    # stale checksum: each is ignored (re-hash), never a crash nor trusted.
    edited = json.loads(stamp.read_text())
    edited["files"]["train_000.bin"]["mtime_ns"] += 1
    for damage in (b"\xff\x00garbage", stamp.read_bytes()[:-40], b"[1, 2]", b'{"files": {}}',
                   json.dumps(edited).encode()):
        stamp.write_bytes(damage)
        hash_calls.clear()
        load_manifest(d)
        assert len(hash_calls) == n, damage[:20]
    # An intact stamp made for the manifest as it was before is not reused either.
    stamp.write_bytes(good_stamp)
    hash_calls.clear()
    load_manifest(d)
    assert len(hash_calls) == n
    # A stamp that cannot be read at all (a folder in its place) also means hashing.
    stamp.unlink()
    stamp.mkdir()
    hash_calls.clear()
    with pytest.warns(UserWarning, match="could not record"):
        load_manifest(d)
    assert len(hash_calls) == n


def test_verification_works_on_a_read_only_data_folder(tmp_path, hash_calls, monkeypatch):
    import cocomix.data.shards as shards

    d = prepare_data(_synthetic_cfg(tmp_path / "data", shard_tokens=20_000), progress=False)
    n = _n_files(load_manifest(d, verify=False))
    d.chmod(0o555)
    try:
        if os.access(d, os.W_OK):  # root ignores the mode: make the write fail as a read-only mount would
            def read_only(path, *a, **kw):
                raise PermissionError(30, "Read-only file system", str(path))

            monkeypatch.setattr(shards, "atomic_write_json", read_only)
        for _ in range(2):
            with pytest.warns(UserWarning, match="could not record the shard verification"):
                load_manifest(d)
        assert len(hash_calls) == 2 * n  # verified both times, nothing recorded
        assert not (d / "manifest.verified.json").exists()
    finally:
        d.chmod(0o755)


def test_prepare_skips_when_current_and_rebuilds_on_change(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "data")
    d = prepare_data(cfg, progress=False)
    stamp = (d / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    prepare_data(cfg, progress=False)
    assert time.perf_counter() - t0 < 0.5 and (d / "manifest.json").stat().st_mtime_ns == stamp
    prepare_data(cfg, progress=False, force=True)
    assert (d / "manifest.json").stat().st_mtime_ns != stamp
    before = load_manifest(d)["splits"]["val"]["n_docs"]
    cfg.data.val_fraction = 0.3
    prepare_data(cfg, progress=False)
    assert load_manifest(d)["splits"]["val"]["n_docs"] > before
    assert not (d / ".prepare.tmp").exists()


def test_token_blocks_are_non_overlapping_and_never_cross_shards(data_synth):
    _, d = data_synth
    m = load_manifest(d)
    bs = 100
    blocks = TokenBlocks(d, "train", bs)
    shards = [np.fromfile(d / s["file"], dtype="<u2") for s in m["splits"]["train"]["shards"]]
    assert len(blocks) == sum(len(s) // bs for s in shards)
    # Blocks in order = each shard's tokens minus its tail shorter than a block.
    expected = np.concatenate([s[: len(s) // bs * bs] for s in shards])
    got = np.concatenate([blocks[i] for i in range(len(blocks))])
    assert np.array_equal(got, expected)
    batch = blocks.get_batch([3, 0, len(blocks) - 1])
    assert batch.dtype.is_floating_point is False and tuple(batch.shape) == (3, bs)
    assert np.array_equal(batch[1].numpy(), blocks[0]) and np.array_equal(batch[2].numpy(), blocks[-1])
    assert blocks.get_concepts([0, 1]).shape == (2, bs, 2)
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_unigram_entropy_matches_direct_computation(data_synth):
    _, d = data_synth
    ids = _read_split(d, "val")
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    assert TokenBlocks(d, "val", 32).unigram_entropy() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)


def test_block_order_is_a_seeded_permutation_per_epoch():
    order = BlockOrder(10, seed=3)
    e0, e1 = order.take(0, 10), order.take(10, 10)
    assert sorted(e0) == sorted(e1) == list(range(10)) and not np.array_equal(e0, e1)
    assert np.array_equal(e0, np.random.default_rng([3, 0]).permutation(10))
    assert np.array_equal(order.take(7, 25), np.concatenate([e0, e1, order.take(20, 20)])[7:32])
    assert np.array_equal(BlockOrder(10, seed=3).take(13, 4), order.take(13, 4))  # resume = same stream
    assert not np.array_equal(BlockOrder(10, seed=4).take(0, 10), e0)


def test_tokenizer_mismatch_is_detected(data_synth, tmp_path):
    _, d = data_synth
    check_tokenizer_matches(d, d / "tokenizer", model_vocab_size=400)
    check_tokenizer_matches(d, tokenizer_hash(d / "tokenizer"))
    other = train_bpe(["some other text entirely"] * 50, vocab_size=270)
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(DataError, match="does not match"):
        check_tokenizer_matches(d, tmp_path / "other")
    with pytest.raises(DataError, match="exceeds the model vocab_size 300"):
        check_tokenizer_matches(d, d / "tokenizer", model_vocab_size=300)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def _text_cfg(paths, **kw) -> DataConfig:
    return DataConfig(source="text", paths=[str(p) for p in paths], **kw)


def test_bad_corpus_paths_raise_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "book.pdf").write_text("x")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    cases = [
        (tmp_path / "nope", "not found"),
        (tmp_path / "empty", "no .txt/.jsonl/.parquet files"),
        (tmp_path / "book.pdf", "unknown extension"),
        (tmp_path / "blank", "no documents"),
    ]
    for path, what in cases:
        with pytest.raises(DataError, match=what) as e:
            list(iter_documents(_text_cfg([path])))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("a single document")
    cfg = Config(data=_text_cfg([one], dir=str(tmp_path / "out")), tokenizer=TokenizerConfig(vocab_size=260))
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare_data(cfg, progress=False)


GUTENBERG_SAMPLE = (
    "The Project Gutenberg EBook of Foo\r\nlicence blah\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\n\r\nChapter 1\r\nIt was a dark night.\r\n\r\n"
    "End of the Project Gutenberg EBook of Foo\r\n*** END OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\nmore licence\r\n"
)


def test_gutenberg_stripping_on_sample_markers(tmp_path):
    (tmp_path / "b.txt").write_bytes(GUTENBERG_SAMPLE.encode())
    (tmp_path / "c.txt").write_text("no markers\r\nat all\r\n")
    old = "header\n***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\nlegal\n"
    old += "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody text.\nEnd of Project Gutenberg Etext x\n"
    (tmp_path / "d.txt").write_text(old)
    docs = [d.text for d in iter_documents(_text_cfg([tmp_path], strip_gutenberg=True))]
    assert docs == ["Chapter 1\nIt was a dark night.\n", "no markers\nat all\n", "Body text.\n"]
    raw = [d.text for d in iter_documents(_text_cfg([tmp_path / "b.txt", tmp_path / "c.txt"]))]
    assert raw[0] == GUTENBERG_SAMPLE.replace("\r\n", "\n")


@pytest.mark.parametrize("book", ["Alcott_Louisa_May__An_Old_Fashioned_Girl.txt",
                                  "Shakespeare_William__The_History_of_King_Henry_the_Sixth_Third_Part.txt"])
def test_gutenberg_stripping_on_a_real_book(book):
    path = GUTENBERG / book
    if not path.is_file():
        pytest.skip(f"Gutenberg book not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    (text,) = [d.text for d in iter_documents(_text_cfg([path], strip_gutenberg=True))]
    assert "\r" not in text
    assert not re.search(r"\*\*\* ?(START|END) OF|SMALL PRINT|End of (the )?Project Gutenberg", text)
    body = raw.replace("\r\n", "\n")
    assert text.strip() in body and 0.5 * len(body) < len(text) < len(body)


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"document number {i}\r\nsecond line" for i in range(30)]
    with (tmp_path / "a.jsonl").open("w") as f:
        for r in rows[:10]:
            f.write(json.dumps({"body": r, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": rows[10:]}), tmp_path / "b.parquet", row_group_size=7)
    data = _text_cfg([tmp_path], text_field="body", val_fraction=0.2, split_seed=1)
    docs = list(iter_documents(data))
    assert [d.text for d in docs] == [r.replace("\r\n", "\n") for r in rows]
    splits = Counter(d.split for d in docs)
    assert splits["val"] >= 1 and splits["train"] >= 1
    assert [d.split for d in iter_documents(data)] == [d.split for d in docs]  # deterministic
    data.max_docs = 12
    assert len(list(iter_documents(data))) == 12
    with pytest.raises(DataError, match="'text'"):
        list(iter_documents(_text_cfg([tmp_path / "b.parquet"])))


def test_hf_source_offline_uses_the_train_test_split_recipe(tmp_path):
    import datasets

    folder = tmp_path / "owt"
    folder.mkdir()
    with (folder / "train.jsonl").open("w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"web page {i} says hello"}) + "\n")
    data = DataConfig(source="hf", hf_path=str(folder), val_fraction=0.05, split_seed=2357)
    docs = list(iter_documents(data))
    val = [d.text for d in docs if d.split == "val"]
    assert len(val) == 20 and len(docs) == 400
    ref = datasets.load_dataset(str(folder), split="train").train_test_split(test_size=0.05, seed=2357)
    assert val == ref["test"]["text"]
    # A save_to_disk folder works too and gives the same split.
    datasets.load_dataset(str(folder), split="train").save_to_disk(str(tmp_path / "saved"))
    data.hf_path = str(tmp_path / "saved")
    assert [d.text for d in iter_documents(data) if d.split == "val"] == val
    with pytest.raises(DataError, match="missing-dataset"):
        list(iter_documents(DataConfig(source="hf", hf_path=str(tmp_path / "missing-dataset"))))


def test_prepare_text_source_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"book{i}.txt").write_bytes(GUTENBERG_SAMPLE.replace("dark", f"dark {i}").encode())
    cfg = Config(
        data=_text_cfg([corpus], strip_gutenberg=True, val_fraction=0.3, dir=str(tmp_path / "data")),
        tokenizer=TokenizerConfig(vocab_size=300),
    )
    d = prepare_data(cfg, progress=False)
    m = load_manifest(d)
    assert m["concepts"] is None and not (d / "train_000.concepts.bin").exists()
    assert m["splits"]["train"]["n_docs"] + m["splits"]["val"]["n_docs"] == 6
    tok = load_tokenizer(d / "tokenizer")
    assert tok.decode(_read_split(d, "val")).count("Chapter 1\nIt was a dark") == m["splits"]["val"]["n_docs"]
    with pytest.raises(DataError, match="only the synthetic source"):
        TokenBlocks(d, "train", 8).get_concepts([0])


# A PNG header and random bytes with NULs: what a mis-saved download in a text corpus looks like.
PNG_LIKE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()


def _small_corpus(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"book{i}.txt").write_text(f"Book {i}. It was a dark and stormy night; the rain fell {i} times.\n")
    return folder


def test_binary_file_in_a_text_corpus_is_one_cli_error_line_naming_it(tmp_path):
    """Old code decoded it with errors='replace' and trained on the noise."""
    corpus = _small_corpus(tmp_path / "corpus")
    (corpus / "page_017.txt").write_bytes(PNG_LIKE)
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "cocomix.cli", "prepare-data", "data.source=text", f"data.paths=[{corpus}]",
           f"data.dir={data_dir}", "tokenizer.vocab_size=300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(err) == 1 and err[0].startswith("cocomix: error:"), proc.stderr
    assert f"{corpus / 'page_017.txt'}: not UTF-8 text: invalid byte 0x89 at offset 0" in err[0]
    assert "data.max_bad_files" in err[0]
    assert not (data_dir / "manifest.json").exists()


def test_files_that_are_not_text_are_skipped_up_to_the_threshold_and_reported(tmp_path, capsys):
    corpus = _small_corpus(tmp_path / "corpus")
    (corpus / "page_017.txt").write_bytes(PNG_LIKE)
    clean = _small_corpus(tmp_path / "clean")  # the same corpus without the binary file

    def prepare(folder, name, **kw):
        cfg = Config(data=_text_cfg([folder], val_fraction=0.3, dir=str(tmp_path / name), **kw),
                     tokenizer=TokenizerConfig(vocab_size=300))
        return prepare_data(cfg, progress=False)

    d = prepare(corpus, "data", max_bad_files=1)
    warning = [l for l in capsys.readouterr().err.splitlines() if "page_017" in l]
    assert len(warning) == 1 and warning[0].startswith("warning: skipped 1 ")
    m = load_manifest(d)
    assert m["skipped_files"] == {"count": 1, "files": [
        {"path": str(corpus / "page_017.txt"), "reason": "not UTF-8 text: invalid byte 0x89 at offset 0"}]}
    # No token comes from the binary file: tokenizer and shards equal those of the corpus without it.
    ref = prepare(clean, "ref")
    assert load_manifest(ref)["skipped_files"] == {"count": 0, "files": []}
    assert m["tokenizer_hash"] == load_manifest(ref)["tokenizer_hash"]
    for split in ("train", "val"):
        assert np.array_equal(_read_split(d, split), _read_split(ref, split))
    assert "\ufffd" not in load_tokenizer(d / "tokenizer").decode(_read_split(d, "train"))
    # One more than the threshold is an error naming the first bad file.
    (corpus / "zz_nul.txt").write_bytes(b"looks like text\x00\x00\x01\x02")
    with pytest.raises(DataError, match=r"2 files are not text, more than data.max_bad_files \(1\); the first: .*page_017") as e:
        list(iter_documents(_text_cfg([corpus], max_bad_files=1)))
    assert "\n" not in str(e.value)
    skipped = []
    docs = list(iter_documents(_text_cfg([corpus], max_bad_files=2), skipped=skipped))
    assert len(docs) == 6 and [f["reason"] for f in skipped][1] == "contains NUL bytes (a binary file?)"


def test_non_utf8_text_is_an_error_with_a_hint_or_decoded_with_data_encoding(tmp_path):
    (tmp_path / "cafe.txt").write_bytes("Un caf\u00e9, s'il vous pla\u00eet.\n".encode("latin-1"))
    (tmp_path / "plain.txt").write_bytes(b"Plain ASCII text.\n")
    with pytest.raises(DataError) as e:
        list(iter_documents(_text_cfg([tmp_path])))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'cafe.txt'}: not UTF-8 text: invalid byte 0xe9 at offset 6")
    assert "data.encoding" in msg and "\n" not in msg
    docs = [d.text for d in iter_documents(_text_cfg([tmp_path], encoding="cp1252"))]
    assert docs == ["Un caf\u00e9, s'il vous pla\u00eet.\n", "Plain ASCII text.\n"]
    # The encoding is checked with the config: known, and ASCII-compatible (.jsonl lines end at b"\n").
    assert load_config(None, ["data.encoding=latin-1"]).data.encoding == "latin-1"
    for bad, what in (("nope", "unknown encoding"), ("utf-16", "not ASCII-compatible")):
        with pytest.raises(ConfigError, match=f"data.encoding.*{what}"):
            load_config(None, [f"data.encoding={bad}"])


def test_bom_jsonl_and_parquet_files_that_are_not_text(tmp_path):
    (tmp_path / "a_bom.txt").write_bytes(b"\xef\xbb\xbfWith a byte-order mark.\n")
    (tmp_path / "b_bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "bom row"}).encode() + b"\n")
    (tmp_path / "c_binary.jsonl").write_bytes(PNG_LIKE)
    (tmp_path / "d_broken.parquet").write_bytes(PNG_LIKE)
    skipped = []
    docs = [d.text for d in iter_documents(_text_cfg([tmp_path], max_bad_files=2), skipped=skipped)]
    assert docs == ["With a byte-order mark.\n", "bom row"]
    assert [Path(f["path"]).name for f in skipped] == ["c_binary.jsonl", "d_broken.parquet"]
    assert skipped[1]["reason"].startswith("not a Parquet file")
    # Bad bytes after a .jsonl file's first documents cannot be skipped: an error at their line.
    late = tmp_path / "late"
    late.mkdir()
    (late / "x.jsonl").write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: not UTF-8 text: invalid byte 0xff"):
        list(iter_documents(_text_cfg([late], max_bad_files=5)))
    # A corpus of nothing but skipped files says so.
    only = tmp_path / "only"
    only.mkdir()
    (only / "p.txt").write_bytes(PNG_LIKE)
    with pytest.raises(DataError, match=r"no documents found.*1 files skipped as not text, the first: .*p\.txt"):
        list(iter_documents(_text_cfg([only], max_bad_files=1)))


def test_hf_source_takes_data_files_and_streams_with_a_per_document_split(tmp_path):
    """`data.hf_data_files` and `data.hf_streaming`: a streamed `json` dataset over local files gives the
    documents, and the seeded per-document split, of the text source over the same files; without
    streaming the same documents come through `train_test_split`."""
    import json as _json

    from cocomix.config import load_config
    from cocomix.data import iter_documents

    files = []
    for f in range(2):
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("".join(_json.dumps({"text": f"document {f}-{i} " + "word " * (i % 7)}) + "\n" for i in range(60)))
        files.append(str(path))
    base = ["data.val_fraction=0.2", "data.split_seed=11"]
    streamed = load_config(None, base + ["data.source=hf", "data.hf_path=json", f"data.hf_data_files={_json.dumps(files)}",
                                         "data.hf_streaming=true"])
    text = load_config(None, base + ["data.source=text", f"data.paths={_json.dumps(files)}"])
    whole = load_config(None, base + ["data.source=hf", "data.hf_path=json", f"data.hf_data_files={_json.dumps(files)}"])
    got = [(d.text, d.split) for d in iter_documents(streamed.data)]
    assert got == [(d.text, d.split) for d in iter_documents(text.data)]
    assert len(got) == 120 and {s for _, s in got} == {"train", "val"}
    assert sorted(d.text for d in iter_documents(whole.data)) == sorted(t for t, _ in got)
