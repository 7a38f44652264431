"""Data module: bundled corpus, user text and token files, batches, and the errors users see."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from moeforge.runtime import _data
from moeforge.runtime._data import (
    BUNDLED_NAME,
    HEADER_BYTES,
    MAGIC,
    Corpus,
    DataError,
    load_corpus,
    read_token_file,
    write_token_file,
)


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    load_corpus(cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def bundled(bundled_cache) -> Corpus:
    return load_corpus("bundled", cache_dir=bundled_cache)


def _as_bytes(tokens: np.ndarray) -> bytes:
    return tokens.astype(np.uint8).tobytes()


def _text_corpus(tmp_path: Path, n_bytes: int = 20_000) -> Corpus:
    text = bytes(np.random.default_rng(0).integers(32, 127, n_bytes, dtype=np.uint8))
    (tmp_path / "a.txt").write_bytes(text)
    return load_corpus(tmp_path / "a.txt", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------- bundled corpus


def test_bundled_corpus_is_byte_level_python_source(bundled):
    assert bundled.name == BUNDLED_NAME
    assert (bundled.vocab_size, bundled.bytes_per_token) == (256, 1.0)
    assert isinstance(bundled.train, np.memmap) and isinstance(bundled.val, np.memmap)
    assert bundled.train.dtype == np.uint16 and bundled.train.ndim == 1
    # a few MB of real text, with validation about 1/20 of it (document-level split)
    assert len(bundled.train) > 1_000_000
    assert 0.02 < len(bundled.val) / (len(bundled.train) + len(bundled.val)) < 0.10
    assert int(bundled.train.max()) < 256
    assert b"def " in _as_bytes(bundled.train[:100_000]) and b"import " in _as_bytes(bundled.val[:100_000])


def test_bundled_corpus_is_cached_not_rebuilt(bundled_cache, monkeypatch):
    files = sorted(bundled_cache.glob("stdlib-*.bin"))
    assert [p.name.split(".", 1)[1] for p in files] == ["train.bin", "val.bin"]
    mtimes = [p.stat().st_mtime_ns for p in files]

    def no_rebuild(*args):
        raise AssertionError("bundled corpus was rebuilt although it is cached")

    monkeypatch.setattr(_data, "_build_bundled", no_rebuild)
    again = load_corpus(None, cache_dir=bundled_cache)
    assert len(again.train) > 0
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert not list(bundled_cache.glob(".*.tmp"))  # atomic writes left no temp files behind


def test_bundled_cache_dir_comes_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "envcache"))
    corpus = load_corpus()
    assert len(list((tmp_path / "envcache").glob("stdlib-*.bin"))) == 2
    assert len(corpus.val) > 0


def test_bundled_split_is_by_document_deterministic_and_disjoint(bundled):
    root, files = _data._stdlib_files()
    assert files == _data._stdlib_files()[1]  # same order every time
    assert not any({"site-packages", "test", "tests"} & set(rel.parts) for rel in files)
    val_docs = [rel for rel in files if _data._is_val_document(rel)]
    train_docs = [rel for rel in files if not _data._is_val_document(rel)]
    assert val_docs and train_docs
    # the splits are exactly the concatenations of their documents, so no document is in both
    assert len(bundled.val) == sum((root / rel).stat().st_size for rel in val_docs)
    assert len(bundled.train) == sum((root / rel).stat().st_size for rel in train_docs)
    first_val = (root / val_docs[0]).read_bytes()
    assert _as_bytes(bundled.val[: len(first_val)]) == first_val


def test_cache_key_changes_with_the_file_list(tmp_path, monkeypatch):
    root, files = _data._stdlib_files()
    load_corpus(cache_dir=tmp_path)
    monkeypatch.setattr(_data, "_stdlib_files", lambda: (root, files[:-1]))  # "a different Python"
    load_corpus(cache_dir=tmp_path)
    assert len(list(tmp_path.glob("stdlib-*.train.bin"))) == 2


# ------------------------------------------------------------------------------------------- batches


def test_sample_batch_shapes_dtypes_and_shift(bundled):
    gen = torch.Generator().manual_seed(0)
    x, y = bundled.sample_batch("train", 4, 32, gen)
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_sample_batch_is_reproducible_and_random(bundled):
    a = bundled.sample_batch("val", 8, 16, torch.Generator().manual_seed(1))
    b = bundled.sample_batch("val", 8, 16, torch.Generator().manual_seed(1))
    c = bundled.sample_batch("val", 8, 16, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sample_batch_rows_are_windows_of_the_split(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)  # each token is its own position
    write_token_file(tmp_path / "t.bin", tokens)
    corpus = load_corpus(tmp_path / "t.bin", cache_dir=tmp_path)
    x, y = corpus.sample_batch("train", 16, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x + 1, y)
    assert torch.equal(x - x[:, :1], torch.arange(10).expand(16, 10))
    assert int(y.max()) < len(corpus.train)  # never reads past the train split into val
    xv, _ = corpus.sample_batch("val", 16, 10, torch.Generator().manual_seed(0))
    assert int(xv.min()) >= len(corpus.train)


def test_sample_batch_rejects_unknown_split(bundled):
    with pytest.raises(ValueError, match="'train' or 'val'"):
        bundled.sample_batch("test", 1, 8, torch.Generator())


def test_val_batches_fixed_spread_and_non_overlapping(tmp_path):
    write_token_file(tmp_path / "t.bin", np.arange(40_000, dtype=np.uint16))
    corpus = load_corpus(tmp_path / "t.bin", cache_dir=tmp_path)  # val: tokens 38_000 .. 39_999
    batches = corpus.val_batches(batch_size=4, seq_len=64, max_tokens=640)
    again = corpus.val_batches(batch_size=4, seq_len=64, max_tokens=640)
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # 10 windows, last batch partial
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True)
    )
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert torch.equal(x + 1, y)
    starts = x[:, 0].tolist()
    assert starts[0] == len(corpus.train) and int(y[-1, -1]) == 39_999  # spread from start to end of val
    assert all(b - a >= 65 for a, b in pairwise(starts))  # windows of seq_len + 1 never overlap


def test_val_batches_capped_by_split_size(tmp_path):
    write_token_file(tmp_path / "t.bin", np.arange(10_000, dtype=np.uint16))
    corpus = load_corpus(tmp_path / "t.bin", cache_dir=tmp_path)
    assert len(corpus.val) == 2049
    batches = corpus.val_batches(batch_size=100, seq_len=40, max_tokens=10**9)
    assert sum(len(x) for x, _ in batches) == 2049 // 41 == 49


def test_too_few_tokens_for_one_sequence_is_a_data_error(tmp_path):
    corpus = _text_corpus(tmp_path, n_bytes=3000)  # val gets n // 2 = 1500 tokens
    with pytest.raises(DataError, match=r"val split has 1500 tokens.*seq_len \+ 1 = 2049"):
        corpus.sample_batch("val", 1, 2048, torch.Generator())
    with pytest.raises(DataError, match="shorter seq_len"):
        corpus.val_batches(1, 4096, 4096)


def test_bits_per_byte(bundled, tmp_path):
    assert bundled.bits_per_byte(math.log(2) * 3) == pytest.approx(3.0)
    write_token_file(tmp_path / "t.bin", np.arange(100, dtype=np.uint16))
    assert load_corpus(tmp_path / "t.bin", cache_dir=tmp_path).bits_per_byte(1.0) is None


# ------------------------------------------------------------------------------------------- user text


def test_text_file_is_byte_tokenized_and_cached(tmp_path):
    text = "Hello, wörld!\n" * 4000  # 60 kB: 5% is above the 2049-token floor
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "a.txt"), cache_dir=tmp_path / "cache")
    assert (corpus.vocab_size, corpus.bytes_per_token) == (256, 1.0)
    data = text.encode()
    assert _as_bytes(np.concatenate([corpus.train, corpus.val])) == data
    assert len(corpus.val) == math.ceil(len(data) / 20)
    cached = list((tmp_path / "cache").glob("text-*.bin"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    load_corpus(tmp_path / "a.txt", cache_dir=tmp_path / "cache")
    assert cached[0].stat().st_mtime_ns == mtime
    (tmp_path / "a.txt").write_text(text + "more", encoding="utf-8")  # new content, new cache file
    load_corpus(tmp_path / "a.txt", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("text-*.bin"))) == 2


def test_text_folder_concatenates_sorted_text_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"B" * 3000)
    (folder / "a.md").write_bytes(b"A" * 3000)
    (folder / "sub" / "c.txt").write_bytes(b"C" * 3000)
    (folder / ".hidden").write_bytes(b"H" * 3000)
    (folder / "image.png").write_bytes(b"\x89PNG\0\0" * 500)
    corpus = load_corpus(folder, cache_dir=tmp_path / "cache")
    assert _as_bytes(np.concatenate([corpus.train, corpus.val])) == b"A" * 3000 + b"B" * 3000 + b"C" * 3000


def test_byte_level_rejects_small_vocab(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 5000)
    with pytest.raises(DataError, match="vocab_size >= 256"):
        load_corpus(tmp_path / "a.txt", cache_dir=tmp_path, vocab_size=100)
    assert load_corpus(tmp_path / "a.txt", cache_dir=tmp_path, vocab_size=512).vocab_size == 512


# ------------------------------------------------------------------------------------------- token files


def test_token_file_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 3000).astype(np.uint16)
    write_token_file(tmp_path / "x.bin", tokens)
    raw = (tmp_path / "x.bin").read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    assert list(np.frombuffer(raw[:12], dtype="<i4")) == [MAGIC, 1, 3000]
    back = read_token_file(tmp_path / "x.bin")
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)


def test_single_bin_file_tail_split(tmp_path):
    tokens = np.arange(100_000, dtype=np.uint32) % 50_000
    write_token_file(tmp_path / "x.bin", tokens)
    corpus = load_corpus(tmp_path / "x.bin", cache_dir=tmp_path)
    assert (corpus.vocab_size, corpus.bytes_per_token) == (50257, None)
    assert len(corpus.val) == 5000
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)


def test_bin_folder_and_pattern_with_train_and_val_shards(tmp_path):
    write_token_file(tmp_path / "fw_train_000001.bin", np.full(3000, 1))
    write_token_file(tmp_path / "fw_train_000002.bin", np.full(2000, 2))
    write_token_file(tmp_path / "fw_val_000000.bin", np.full(1000, 3))
    for source in (tmp_path, str(tmp_path / "fw_*.bin")):
        corpus = load_corpus(source, cache_dir=tmp_path / "cache", vocab_size=10)
        assert corpus.vocab_size == 10
        np.testing.assert_array_equal(corpus.train, [1] * 3000 + [2] * 2000)
        np.testing.assert_array_equal(corpus.val, [3] * 1000)
    assert len(list((tmp_path / "cache").glob("shards-*.bin"))) == 1  # joined once, then reused


def test_bin_folder_without_val_shards(tmp_path):
    write_token_file(tmp_path / "fw_train_000001.bin", np.zeros(3000))
    with pytest.raises(DataError, match=r"\*val\*\.bin.*found 1 train, 0 val"):
        load_corpus(tmp_path, cache_dir=tmp_path / "cache")


def test_token_ids_outside_vocab(tmp_path):
    write_token_file(tmp_path / "x.bin", np.arange(5000))
    with pytest.raises(DataError, match="token id 4999 .* vocab_size=5000"):
        load_corpus(tmp_path / "x.bin", cache_dir=tmp_path, vocab_size=1000)


# ------------------------------------------------------------------------------------------- errors users see


def _header(*ints: int) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[: len(ints)] = ints
    return header.tobytes()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (_header(12345, 1, 10) + b"\0" * 20, "not a token file: header magic is 12345"),
        (_header(MAGIC, 7, 10) + b"\0" * 20, "version 7 is not supported"),
        (
            _header(MAGIC, 1, 10) + b"\0" * 7,
            r"header says 10 tokens \(1044 bytes\) but the file has 1031 bytes",
        ),
        (_header(MAGIC, 1, 10)[:500], "500 bytes is too short .* header"),
        (b"", "0 bytes is too short"),
        (_header(MAGIC, 1, 0), "holds no tokens"),
    ],
    ids=["bad-magic", "bad-version", "truncated-tokens", "truncated-header", "empty", "no-tokens"],
)
def test_corrupt_token_file(tmp_path, content, match):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        load_corpus(tmp_path / "x.bin", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "x.bin") in message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_corpus(tmp_path / "nope.txt", cache_dir=tmp_path)
    with pytest.raises(DataError, match="no such token file"):
        read_token_file(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="no .bin token files found"):
        load_corpus(str(tmp_path / "nope_*.bin"), cache_dir=tmp_path)


def test_empty_text(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path / "empty.txt", cache_dir=tmp_path / "cache")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="folder holds no text files"):
        load_corpus(tmp_path / "emptydir", cache_dir=tmp_path / "cache")


def test_unwritable_cache_is_a_data_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 5000)
    (tmp_path / "file").write_bytes(b"")  # a cache "dir" below a regular file cannot be created
    with pytest.raises(DataError, match="cannot write cache file .* MOEFORGE_CACHE"):
        load_corpus(tmp_path / "a.txt", cache_dir=tmp_path / "file" / "cache")


def test_token_file_max_id_is_scanned_once_per_file_version(tmp_path, monkeypatch):
    """The largest id (for the vocabulary check) is read whole once, then from a record in the cache dir;
    rewriting the file (new size or mtime) scans it again."""
    scans: list[int] = []
    real_scan = _data._scan_max_token
    monkeypatch.setattr(
        _data, "_scan_max_token", lambda tokens: scans.append(len(tokens)) or real_scan(tokens)
    )
    path, cache = tmp_path / "x.bin", tmp_path / "cache"
    write_token_file(path, np.arange(10_000) % 7000)
    assert load_corpus(path, cache_dir=cache).min_vocab_size == 7000
    assert scans == [10_000]
    again = load_corpus(path, cache_dir=cache)
    assert again.min_vocab_size == 7000 and scans == [10_000]  # not rescanned
    with pytest.raises(DataError, match="token id 6999"):
        load_corpus(path, cache_dir=cache, vocab_size=5000)  # the recorded max still checks the vocabulary
    assert scans == [10_000]
    write_token_file(path, np.arange(12_000) % 9000)
    assert load_corpus(path, cache_dir=cache).min_vocab_size == 9000 and scans == [10_000, 12_000]


def test_token_shards_max_id_is_scanned_once_and_unwritable_cache_only_rescans(tmp_path, monkeypatch):
    scans: list[int] = []
    real_scan = _data._scan_max_token
    monkeypatch.setattr(
        _data, "_scan_max_token", lambda tokens: scans.append(len(tokens)) or real_scan(tokens)
    )
    write_token_file(tmp_path / "a_train_1.bin", np.full(3000, 11))
    write_token_file(tmp_path / "a_train_2.bin", np.full(2000, 40))
    write_token_file(tmp_path / "a_val_1.bin", np.full(1000, 5))
    for _ in range(2):
        assert load_corpus(tmp_path, cache_dir=tmp_path / "cache").min_vocab_size == 41
    assert sorted(scans) == [1000, 2000, 3000]  # each shard once
    (tmp_path / "file").write_bytes(b"")
    single = tmp_path / "a_train_1.bin"
    for _ in range(2):  # a cache "dir" below a regular file: no record, no error, a scan each time
        assert load_corpus(single, cache_dir=tmp_path / "file" / "c").min_vocab_size == 12
    assert sorted(scans) == [1000, 2000, 3000, 3000, 3000]
