"""moeforge.runtime.prepare_data: sources and tokenizers in, token shards + meta.json out, read by memmap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from moeforge.runtime import DataError, TokenStream, load_corpus, prepare_data, read_token_file
from moeforge.runtime._prepare import is_val_document

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "box",
    "jumping",
    "frogs",
]


def _doc(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    return " ".join(WORDS[j] for j in rng.integers(len(WORDS), size=n_words)) + f" doc{i}.\n"


def _text_folder(root: Path, n: int = 40) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"{i:03d}.txt").write_text(_doc(i))
    (root / "image.png").write_bytes(b"\x89PNG\0\0binary")  # skipped in a folder: not text
    return root


def _jsonl(path: Path, n: int = 60, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: _doc(i), "id": i}) + "\n" for i in range(n)))
    return path


def test_text_folder_bytes_round_trip(tmp_path):
    src = _text_folder(tmp_path / "src")
    meta = prepare_data([str(src)], tmp_path / "ds", tokenizer="bytes", val_fraction=0.1, workers=1)
    assert meta["tokenizer"]["name"] == "bytes" and meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 36
    corpus = load_corpus(tmp_path / "ds")
    assert corpus.level == "bytes" and corpus.min_vocab_size == 256
    assert corpus.fingerprint == meta["fingerprint"]
    # documents come back exactly, each followed by end-of-text (byte 0), in source order
    docs = np.asarray(corpus.val).astype(np.uint8).tobytes().split(b"\0")
    val_ids = [i for i in range(40) if is_val_document(i, 0.1, 0)]
    assert docs == [_doc(i).encode() for i in val_ids] + [b""]
    # bytes per token: text bytes over tokens, end-of-text included
    assert meta["bytes_per_token"] == pytest.approx(sum(len(d) for d in docs) / len(corpus.val))


def test_jsonl_trained_tokenizer_and_vocab_check(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl")
    meta = prepare_data([str(src)], tmp_path / "ds", train_vocab=300, val_fraction=0.1, workers=1)
    tok = meta["tokenizer"]
    assert tok["kind"] == "trained" and tok["vocab_size"] <= 300 and tok["eot"] == "<|endoftext|>"
    assert (tmp_path / "ds" / "tokenizer.json").is_file()
    corpus = load_corpus(tmp_path / "ds", vocab_size=300)
    assert corpus.level == "bpe-300" and corpus.min_vocab_size == tok["vocab_size"]
    assert meta["bytes_per_token"] > 1.5  # BPE merges: more than a byte per token
    assert int(np.max(corpus.train)) < tok["vocab_size"]
    from tokenizers import Tokenizer

    decoded = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json")).decode(
        [int(t) for t in corpus.val], skip_special_tokens=False
    )
    assert decoded.split("<|endoftext|>")[0] == _doc(next(i for i in range(60) if is_val_document(i, 0.1, 0)))
    with pytest.raises(DataError, match=r"vocab_size 256 does not cover the tokenizer's vocabulary"):
        load_corpus(tmp_path / "ds", vocab_size=256)
    # the saved tokenizer as TOK gives the same tokens, so the same fingerprint
    again = prepare_data(
        [str(src)], tmp_path / "ds2", tokenizer=str(tmp_path / "ds"), val_fraction=0.1, workers=2
    )
    assert again["fingerprint"] == meta["fingerprint"]


def test_parquet_with_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"content": [_doc(i) for i in range(30)], "n": list(range(30))}), tmp_path / "d.parquet"
    )
    with pytest.raises(DataError, match=r"d.parquet: no column 'text' \(has content, n\); pass --text-field"):
        prepare_data([str(tmp_path / "d.parquet")], tmp_path / "bad", workers=1)
    meta = prepare_data(
        [str(tmp_path / "d.parquet")], tmp_path / "ds", text_field="content", val_fraction=0.2, workers=1
    )
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30


def test_wide_vocabulary_writes_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    vocab.update({w: 69_990 + k for k, w in enumerate(WORDS)})  # the words get ids beyond uint16
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "wide.json"))
    src = _jsonl(tmp_path / "d.jsonl", n=20)
    meta = prepare_data([str(src)], tmp_path / "ds", tokenizer=str(tmp_path / "wide.json"), workers=1)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] > 2**16
    shard = read_token_file(tmp_path / "ds" / "train" / meta["splits"]["train"]["shards"][0]["file"])
    assert shard.dtype == np.dtype("<u4") and int(shard.max()) > 65_535


def test_shards_stream_as_one(tmp_path, monkeypatch):
    from moeforge.runtime import _prepare

    monkeypatch.setattr(_prepare, "_BATCH_BYTES", 2000)  # shards close at batch boundaries
    src = _jsonl(tmp_path / "d.jsonl", n=80)
    meta = prepare_data([str(src)], tmp_path / "ds", shard_tokens=3000, val_fraction=0.1, workers=1)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2
    corpus = load_corpus(tmp_path / "ds")
    assert isinstance(corpus.train, TokenStream) and len(corpus.train) == meta["splits"]["train"]["tokens"]
    whole = np.concatenate([read_token_file(tmp_path / "ds" / "train" / s["file"]) for s in shards])
    for a, b in [(0, 10), (2990, 3100), (100, len(whole)), (len(whole) - 5, len(whole) + 7)]:
        assert np.array_equal(corpus.train[a:b], whole[a:b])
    import torch

    x, y = corpus.sample_batch("train", 4, 64, torch.Generator().manual_seed(0))
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])


def test_split_rule_is_an_exact_spread_fraction():
    for f, seed in [(0.05, 0), (0.1, 3), (0.5, 1)]:
        picks = [i for i in range(1000) if is_val_document(i, f, seed)]
        assert len(picks) == round(1000 * f)
        assert picks[0] < round(1 / f)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: [str(d / "missing.txt")], "missing.txt: no such file or folder"),
        (lambda d: [str(_empty(d))], "no documents"),
        (lambda d: [str(_jsonl_without_field(d))], r"bad.jsonl:3: no 'text' field \(has 'body'\)"),
        (lambda d: [str(_bad_json(d))], r"broken.jsonl:2: not a JSON line"),
    ],
    ids=["missing", "empty", "jsonl-field", "jsonl-syntax"],
)
def test_bad_sources_fail_in_one_line(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as e:
        prepare_data(make(tmp_path), tmp_path / "ds", workers=1)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "ds").rglob("*.bin"))  # nothing that looks like a finished shard


def _empty(d: Path) -> Path:
    (d / "empty.txt").write_text("")
    return d / "empty.txt"


def _jsonl_without_field(d: Path) -> Path:
    lines = [json.dumps({"text": "a"}), json.dumps({"text": "b"}), json.dumps({"body": "c"})]
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return d / "bad.jsonl"


def _bad_json(d: Path) -> Path:
    (d / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    return d / "broken.jsonl"


def test_output_folder_of_another_dataset_is_refused(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", n=30)
    first = prepare_data([str(src)], tmp_path / "ds", workers=1)
    assert prepare_data([str(src)], tmp_path / "ds", workers=1) == first  # done: the same meta, no work
    with pytest.raises(DataError, match="holds another dataset"):
        prepare_data([str(src)], tmp_path / "ds", seed=1, workers=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not a moeforge dataset"):
        prepare_data([str(src)], tmp_path / "other", workers=1)


def test_bad_tokenizers(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", n=10)
    with pytest.raises(DataError, match="no such tokenizer"):
        prepare_data([str(src)], tmp_path / "a", tokenizer=str(tmp_path / "nope.json"), workers=1)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match="no end-of-text token.*--eot"):
        prepare_data([str(src)], tmp_path / "b", tokenizer=str(tmp_path / "t.json"), workers=1)
    with pytest.raises(DataError, match="at least 257"):
        prepare_data([str(src)], tmp_path / "c", train_vocab=100, workers=1)


# A prepare slowed down per batch (so it can be killed between shards) in a child process.
_SLOW_PREPARE = """
import sys, time
from moeforge.runtime import _prepare
fast = _prepare.encode_batch
def slow(texts):
    time.sleep(0.15)
    return fast(texts)
_prepare.encode_batch = slow
_prepare._BATCH_BYTES = 2000
_prepare.prepare_data([sys.argv[1]], sys.argv[2], shard_tokens=4000, val_fraction=0.1, workers=1)
"""


@pytest.mark.slow  # about 5 s: the killed run is slowed down so that it stops between shards
def test_killed_prepare_resumes_keeping_finished_shards(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", n=150)
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(src), str(out)], env=env)
    state = out / ".prepare-state.json"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if state.exists() and len(json.loads(state.read_text())["shards"]["train"]) >= 2:
                break
            assert child.poll() is None, "the prepare finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no shard finished in 60 s")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "meta.json").exists()
    kept = {p.name: p.stat().st_ino for p in (out / "train").glob("shard-*.bin")}
    assert len(kept) >= 2
    from moeforge.runtime import _prepare

    orig = _prepare._BATCH_BYTES
    _prepare._BATCH_BYTES = 2000  # the killed run's batches, so its shard boundaries
    try:
        resumed = prepare_data([str(src)], out, shard_tokens=4000, val_fraction=0.1, workers=1)
        fresh = prepare_data([str(src)], tmp_path / "fresh", shard_tokens=4000, val_fraction=0.1, workers=1)
    finally:
        _prepare._BATCH_BYTES = orig
    assert {p.name: p.stat().st_ino for p in (out / "train").glob("shard-*.bin") if p.name in kept} == kept
    assert resumed["fingerprint"] == fresh["fingerprint"]
    assert resumed["splits"]["train"]["tokens"] == fresh["splits"]["train"]["tokens"]
    assert not list(out.rglob("*.tmp")) and not state.exists()


@pytest.mark.parametrize("field", ["tokenizer", "splits", "bytes_per_token", "fingerprint"])
def test_a_meta_json_missing_a_field_is_one_data_error(tmp_path, field):
    src = _text_folder(tmp_path / "src")
    prepare_data([str(src)], tmp_path / "ds", tokenizer="bytes", val_fraction=0.1, workers=1)
    meta_path = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta[field]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"meta.json: missing or bad field \(KeyError: '{field}'\)"):
        load_corpus(tmp_path / "ds")
