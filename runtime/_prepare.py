"""Prepare a dataset once: text, JSON lines, parquet or Hugging Face datasets in, token shards out.

    DIR/meta.json             what the data is: tokenizer, vocabulary, token counts, bytes per token, the
                              split rule, the fingerprint a search compares; written last, so a folder with
                              meta.json is complete
    DIR/tokenizer.json        the tokenizer (a copy of the one given, or the one trained); absent for bytes
    DIR/train/shard-NNNNNN.bin, DIR/val/shard-NNNNNN.bin
                              `.bin` token files (runtime/_data.py): uint16 when the vocabulary fits, else
                              uint32 (header version 2)

Documents stream from the sources in order (a 100 GB source never sits in memory), each followed by the
tokenizer's end-of-text token. A text file is one document, cut at line ends into pieces of about
`_PIECE_BYTES` when larger (so one big file still has a validation split); a JSON line, a parquet row or a
dataset row is one document. Document i (0-based over all sources) is validation when
floor((i + o + 1) f) > floor((i + o) f), f = val_fraction and o a seed-dependent offset: an exact fraction,
spread evenly, deterministic, and one in every ceil(1 / f) documents.

Worker processes tokenize batches of documents of one split; results are written in submission order, so the
output does not depend on the number of workers. A shard closes at a batch boundary once it holds
`shard_tokens`; it is written under a temporary name, fsynced and renamed, and the progress file
(`.prepare-state.json`) records it. A stopped prepare run again with the same arguments keeps its finished
shards and tokenizes only the documents after them. Batches are formed per split, so shard boundaries (and
the fingerprint, a hash of the shards' hashes) are the same whether or not a run was resumed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._data import PREPARED_FORMAT, PREPARED_META, DataError, token_file_header

STATE_FILE = ".prepare-state.json"
TOKENIZER_FILE = "tokenizer.json"
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
BYTES_EOT = 0  # the bytes tokenizer separates documents with NUL, a byte text never holds
_PIECE_BYTES = 1 << 16
_BATCH_BYTES = 1 << 20  # text per worker task: large enough to amortize pickling, small enough to stream
_TRAIN_TOKENIZER_MAX_BYTES = 1 << 30  # BPE training reads at most this much of the train split
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_HF_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One SRC argument: a path (file or folder), `bundled`, or a Hugging Face dataset name."""

    arg: str
    files: tuple[Path, ...] = ()
    hf: str | None = None  # a hub name[:config] or a save_to_disk folder

    def identity(self) -> list:
        """What must not change between a stopped prepare and its continuation."""
        if self.hf is not None:
            return [self.arg]
        return [self.arg] + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]


def resolve_source(arg: str) -> Source:
    """Check a SRC argument and list its files (a folder: every file below it, sorted, hidden ones skipped)."""
    if arg in ("bundled", "bundled:stdlib"):
        from ._data import _stdlib_files

        root, rels = _stdlib_files()
        return Source(arg, tuple(root / r for r in rels))
    path = Path(arg).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() and (path / "state.json").exists():
            return Source(arg, hf=str(path))  # datasets' save_to_disk folder
        files = tuple(
            sorted(
                (
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
                ),
                key=lambda p: p.relative_to(path).as_posix(),
            )
        )
        if not files:
            raise DataError(f"{path}: empty folder")
        return Source(arg, files)
    if path.exists():
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: cannot read (permission denied)")
        return Source(arg, (path,))
    if _HF_NAME.match(arg) and "/" in arg:
        return Source(arg, hf=arg)
    raise DataError(
        f"{arg}: no such file or folder (a Hugging Face dataset name looks like owner/name[:config])"
    )


def iter_documents(src: Source, text_field: str) -> Iterator[str]:
    """The documents of one source, streamed."""
    if src.hf is not None:
        yield from _hf_documents(src.hf, text_field)
        return
    explicit = len(src.files) == 1 and Path(src.arg).expanduser().is_file()
    for path in src.files:
        name = path.name.lower()
        if name.endswith(_JSON_SUFFIXES):
            yield from _json_documents(path, text_field)
        elif name.endswith(".parquet"):
            yield from _parquet_documents(path, text_field)
        else:
            yield from _text_documents(path, skip_binary=not explicit)


def _text_documents(path: Path, skip_binary: bool) -> Iterator[str]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        try:
            head = f.read(_PIECE_BYTES)
            if skip_binary and b"\0" in head[:8192]:
                return  # not text (an image, a compiled file) in a folder of sources
            rest = b""
            while head:
                data = rest + head
                cut = data.rfind(b"\n") + 1 if len(data) >= _PIECE_BYTES else len(data)
                if cut == 0:
                    cut = len(data)  # one very long line
                piece, rest = data[:cut], data[cut:]
                if piece.strip():
                    yield piece.decode("utf-8", errors="replace")
                head = f.read(_PIECE_BYTES)
            if rest.strip():
                yield rest.decode("utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        f = path.open("r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno}: no {text_field!r} field (has {keys}); pass --text-field")
            text = row[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            if text:
                yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'moeforge[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for unreadable or corrupt files
        raise DataError(f"{path}: cannot read parquet ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (has {', '.join(names)}); pass --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: Hugging Face datasets need the datasets library: pip install 'moeforge[data]'"
        ) from None
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        repo, _, config = name.partition(":")
        ds = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    for i, row in enumerate(ds):
        if text_field not in row:
            raise DataError(
                f"{name}: row {i}: no {text_field!r} field (has {', '.join(row)}); pass --text-field"
            )
        if row[text_field]:
            yield row[text_field]


# ---------------------------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer as the workers rebuild it: "bytes", or a tokenizer.json text."""

    name: str
    vocab_size: int
    eot_id: int
    eot: str
    json: str | None = field(default=None, repr=False)  # None: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.json or "bytes").encode()).hexdigest()


def load_tokenizer(spec: str, eot: str | None = None) -> TokenizerInfo:
    """`bytes`, a tokenizer.json file, or a folder holding one (a transformers tokenizer folder)."""
    if spec == "bytes":
        return TokenizerInfo("bytes", 256, BYTES_EOT, "\\x00")
    path = Path(spec).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{spec}: no such tokenizer (give bytes, a tokenizer.json file, or a folder with tokenizer.json)"
        )
    try:
        text = file.read_text()
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{file}: not a tokenizers tokenizer.json (not UTF-8 text)") from None
    name = path.name if path.is_dir() else (file.parent.name if file.name == TOKENIZER_FILE else file.stem)
    return _tokenizer_info(text, name or "tokenizer", eot, str(file))


def _tokenizer_info(text: str, name: str, eot: str | None, where: str) -> TokenizerInfo:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise DataError(f"{where}: not a tokenizers tokenizer.json ({e})") from None
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > 2**32:
        raise DataError(f"{where}: vocabulary of {vocab} does not fit uint32 token ids")
    names = (eot,) if eot is not None else EOT_NAMES
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return TokenizerInfo(name, vocab, int(i), n, text)
    raise DataError(
        f"{where}: no end-of-text token (tried {', '.join(names)}); name the one to use with --eot TOKEN"
    )


def train_tokenizer(docs: Iterator[str], vocab_size: int, progress: bool) -> str:
    """A byte-level BPE of `vocab_size` (end-of-text `<|endoftext|>` is id 0) trained on `docs`; its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(docs, trainer)
    return tok.to_str()


# worker side: the tokenizer, rebuilt once per process
_WORKER: dict[str, Any] = {}


def _init_worker(tok: TokenizerInfo) -> None:
    _WORKER["eot"] = tok.eot_id
    if tok.json is None:
        _WORKER["tok"] = None
    else:
        from tokenizers import Tokenizer

        _WORKER["tok"] = Tokenizer.from_str(tok.json)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, int]:
    """Token ids of the documents, each followed by end-of-text, as uint32; and their UTF-8 bytes."""
    tok, eot = _WORKER["tok"], _WORKER["eot"]
    encoded = [t.encode("utf-8", errors="replace") for t in texts]
    n_bytes = sum(len(b) for b in encoded)
    if tok is None:
        out = np.frombuffer(b"\0".join(encoded) + b"\0", dtype=np.uint8).astype(np.uint32)
        return out, n_bytes
    ids: list[int] = []
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) is new in 0.20
    for enc in encode(texts, add_special_tokens=False):
        ids += enc.ids
        ids.append(eot)
    return np.array(ids, dtype=np.uint32), n_bytes


# ---------------------------------------------------------------------------------------------- shards


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _ShardWriter:
    """One split's shards: tokens go to a temp file; `close` fsyncs it and renames it to its final name."""

    def __init__(self, folder: Path, itemsize: int, index: int):
        self.folder, self.itemsize, self.index = folder, itemsize, index
        self.f: Any = None

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = self.folder / f".shard-{self.index:06d}.bin.tmp"
        self.f = self.tmp.open("wb")
        self.f.write(token_file_header(0, self.itemsize))  # rewritten with the count on close
        self.h = hashlib.sha256()
        self.tokens = self.docs = self.bytes = 0

    def add(self, tokens: np.ndarray, n_docs: int, n_bytes: int) -> None:
        if self.f is None:
            self._open()
        data = tokens.astype(f"<u{self.itemsize}", copy=False).tobytes()
        self.f.write(data)
        self.h.update(data)
        self.tokens += len(tokens)
        self.docs += n_docs
        self.bytes += n_bytes

    def close(self) -> dict | None:
        if self.f is None:
            return None
        self.f.seek(0)
        self.f.write(token_file_header(self.tokens, self.itemsize))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        name = f"shard-{self.index:06d}.bin"
        os.replace(self.tmp, self.folder / name)
        _fsync_dir(self.folder)
        self.index += 1
        return {
            "file": name,
            "tokens": self.tokens,
            "documents": self.docs,
            "bytes": self.bytes,
            "sha256": self.h.hexdigest(),
        }

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- prepare


def is_val_document(i: int, val_fraction: float, seed: int) -> bool:
    """The split rule: document i is validation when floor((i + o + 1) f) > floor((i + o) f)."""
    o = int.from_bytes(hashlib.sha256(f"moeforge-split-{seed}".encode()).digest()[:8], "little") % max(
        1, math.ceil(1 / val_fraction)
    )
    return math.floor((i + o + 1) * val_fraction) > math.floor((i + o) * val_fraction)


class _Bar:
    """rich progress on stderr (documents, tokens, MB/s of text); a no-op when disabled."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("prepare", info="")
        self.bar.start()

    def update(self, docs: int, tokens: int, n_bytes: int, note: str = "") -> None:
        if self.bar is None:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        info = f"{docs:,} docs  {tokens:,} tokens  {n_bytes / dt / 1e6:.1f} MB/s" + (
            f"  {note}" if note else ""
        )
        self.bar.update(self.task, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def prepare_data(
    sources: list[str],
    out: str | os.PathLike,
    *,
    tokenizer: str | None = "bytes",
    train_vocab: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    eot: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize `sources` into `out` (see the module docstring); return meta.json's content.

    Args:
        sources: text files, folders, JSON lines (`text_field`), parquet files, `bundled` (the standard
            library's sources), or Hugging Face dataset names / save_to_disk folders.
        out: the dataset folder; made, continued (same arguments) or refused (another dataset in it).
        tokenizer: "bytes", a tokenizer.json file or a folder holding one; ignored with `train_vocab`.
        train_vocab: train a byte-level BPE of this vocabulary on the train split and save it in `out`.
        val_fraction: fraction of documents that are validation, in (0, 0.5].
        workers: tokenizing processes (default: the CPUs this process may use); 1 tokenizes in-process.
        shard_tokens: a shard closes at the first batch boundary after this many tokens.
        eot: the end-of-text token's name, when the tokenizer's is not one of `EOT_NAMES`.

    Raises:
        DataError: in one line: a missing or unreadable source, a JSON line without the field (file:line),
            no documents, a bad tokenizer, a folder that holds another dataset.
    """
    out = Path(out)
    _check_arguments(sources, val_fraction, train_vocab, shard_tokens)
    srcs = [resolve_source(s) for s in sources]
    tok: TokenizerInfo | None = None
    if train_vocab is None:
        tok = load_tokenizer(tokenizer or "bytes", eot)
    config = {
        "sources": [s.identity() for s in srcs],
        "tokenizer": {"train_vocab": train_vocab}
        if tok is None
        else {"name": tok.name, "sha256": tok.sha256},
        "eot": eot,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    say = log or (lambda _msg: None)
    done, state = _open_output(out, config, say)
    if done is not None:
        return done

    def documents() -> Iterator[tuple[bool, str]]:
        return _split_documents(srcs, text_field, val_fraction, seed)

    if tok is None:
        assert train_vocab is not None
        tok = _trained_tokenizer(out, train_vocab, documents, progress, say)
    elif tok.json is not None:
        (out / TOKENIZER_FILE).write_text(tok.json)
    itemsize = 2 if tok.vocab_size <= 2**16 else 4
    n_docs = _write_shards(out, state, tok, itemsize, documents(), shard_tokens, workers, progress)
    meta = _meta(
        state, tok, itemsize, n_docs, sources, tokenizer, train_vocab, text_field, val_fraction, seed, config
    )
    _write_json_atomic(out / PREPARED_META, meta)
    (out / STATE_FILE).unlink(missing_ok=True)
    return meta


def _check_arguments(
    sources: list[str], val_fraction: float, train_vocab: int | None, shard_tokens: int
) -> None:
    if not sources:
        raise DataError("give at least one source")
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    if train_vocab is not None and not 257 <= train_vocab <= 2**32:
        raise DataError(
            f"--train-tokenizer needs a vocabulary of at least 257 (256 bytes + end-of-text), got {train_vocab}"
        )
    if not 1 <= shard_tokens < 2**31 - _BATCH_BYTES:
        raise DataError(f"--shard-tokens must be in [1, {2**31 - _BATCH_BYTES}), got {shard_tokens}")


def _open_output(
    out: Path, config: dict[str, Any], say: Callable[[str], None]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The output folder: done (its meta.json, when prepared with `config`), resumed or new.

    Returns (meta, state): meta when there is nothing left to do, else None and the progress state (the
    finished shards of a stopped run, or none), written to the folder's progress file.
    """
    meta_path, state_path = out / PREPARED_META, out / STATE_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == config:
            say(f"{out}: already prepared with these arguments")
            return meta, {}
        raise DataError(
            f"{out}: holds another dataset (its meta.json has other sources or options); use another --out"
        )
    state: dict[str, Any] = {"config": config, "shards": {"train": [], "val": []}}
    if state_path.exists():
        held = json.loads(state_path.read_text())
        if held.get("config") != config:
            raise DataError(
                f"{out}: holds a stopped prepare of another dataset (other sources or options); use another --out"
            )
        state = held
        for split in ("train", "val"):
            for shard in state["shards"][split]:
                if not (out / split / shard["file"]).is_file():
                    raise DataError(
                        f"{out / split / shard['file']}: finished shard missing; delete {out} and prepare again"
                    )
            for stale in (out / split).glob(".*.tmp") if (out / split).is_dir() else ():
                stale.unlink()  # a shard being written when the run stopped
        done = sum(len(v) for v in state["shards"].values())
        say(f"{out}: continuing a stopped prepare ({done} finished shards kept)")
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty and not a moeforge dataset; use an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(state_path, state)
    return None, state


def _split_documents(
    srcs: list[Source], text_field: str, val_fraction: float, seed: int
) -> Iterator[tuple[bool, str]]:
    """(is validation, text) for every document of the sources, in order."""
    i = 0
    for src in srcs:
        for text in iter_documents(src, text_field):
            yield is_val_document(i, val_fraction, seed), text
            i += 1


def _trained_tokenizer(
    out: Path,
    train_vocab: int,
    documents: Callable[[], Iterator[tuple[bool, str]]],
    progress: bool,
    say: Callable[[str], None],
) -> TokenizerInfo:
    """The BPE tokenizer trained on the train split, saved in `out` (kept from a stopped run)."""
    tok_path = out / TOKENIZER_FILE
    if not tok_path.exists():
        say(f"training a byte-level BPE tokenizer of vocabulary {train_vocab}")

        def train_docs() -> Iterator[str]:
            seen = 0
            for is_val, text in documents():
                if not is_val:
                    yield text
                    seen += len(text)
                    if seen >= _TRAIN_TOKENIZER_MAX_BYTES:
                        return

        text = train_tokenizer(train_docs(), train_vocab, progress)
        tmp = tok_path.with_name(f".{TOKENIZER_FILE}.tmp")
        tmp.write_text(text)
        os.replace(tmp, tok_path)
    return _tokenizer_info(tok_path.read_text(), f"bpe-{train_vocab}", None, str(tok_path))


def _write_shards(
    out: Path,
    state: dict[str, Any],
    tok: TokenizerInfo,
    itemsize: int,
    documents: Iterator[tuple[bool, str]],
    shard_tokens: int,
    workers: int | None,
    progress: bool,
) -> int:
    """Tokenize the documents after the finished shards in `state` into new shards, recording each in
    `state` and the progress file; return how many documents the shards hold in all."""
    state_path = out / STATE_FILE
    writers = {
        split: _ShardWriter(out / split, itemsize, len(state["shards"][split])) for split in ("train", "val")
    }
    skip = {split: sum(s["documents"] for s in state["shards"][split]) for split in ("train", "val")}
    totals = {"docs": 0, "tokens": 0, "bytes": 0}
    for split in ("train", "val"):
        for s in state["shards"][split]:
            totals["docs"] += s["documents"]
            totals["tokens"] += s["tokens"]
    n_workers = workers or default_workers()
    bar = _Bar(progress)
    # encode_batch_fast runs on tokenizers' own thread pool unless told not to: the workers are the parallelism
    # (and --workers 1 is one core); set before forking, so the children inherit it and tokenizers does not
    # warn about a fork after the BPE trainer's threads ran
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = None
    if n_workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork where there is one: nothing to re-import, and no `__main__` to rerun (spawn needs an importable
        # main module); a worker that dies breaks the pool, which raises, instead of hanging
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(tok,))
    else:
        _init_worker(tok)
    pending: collections.deque = collections.deque()

    def finish_one() -> None:
        split, n_docs, res = pending.popleft()
        tokens, n_bytes = res.result() if pool is not None else res
        w = writers[split]
        w.add(tokens, n_docs, n_bytes)
        totals["docs"] += n_docs
        totals["tokens"] += len(tokens)
        totals["bytes"] += n_bytes
        if w.tokens >= shard_tokens:
            state["shards"][split].append(w.close())
            _write_json_atomic(state_path, state)
        bar.update(totals["docs"], totals["tokens"], totals["bytes"])

    def submit(split: str, texts: list[str]) -> None:
        res = pool.submit(encode_batch, texts) if pool is not None else encode_batch(texts)
        pending.append((split, len(texts), res))
        while len(pending) > (2 * n_workers if pool is not None else 0):
            finish_one()

    batches: dict[str, list[str]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    try:
        for is_val, text in documents:
            split = "val" if is_val else "train"
            if skip[split]:
                skip[split] -= 1
                continue
            batches[split].append(text)
            sizes[split] += len(text)
            if sizes[split] >= _BATCH_BYTES:
                submit(split, batches[split])
                batches[split], sizes[split] = [], 0
        for split in ("train", "val"):
            if batches[split]:
                submit(split, batches[split])
        while pending:
            finish_one()
        for split in ("train", "val"):
            shard = writers[split].close()
            if shard is not None:
                state["shards"][split].append(shard)
        _write_json_atomic(state_path, state)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    return totals["docs"]


def _meta(
    state: dict[str, Any],
    tok: TokenizerInfo,
    itemsize: int,
    n_docs: int,
    sources: list[str],
    tokenizer: str | None,
    train_vocab: int | None,
    text_field: str,
    val_fraction: float,
    seed: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """meta.json's content: the tokenizer, the splits and their shards, the fingerprint a search compares.

    Raises:
        DataError: a split is empty (`n_docs` documents in all).
    """
    splits = {}
    for split in ("train", "val"):
        shards = state["shards"][split]
        if not shards:
            if n_docs == 0:
                raise DataError(f"{', '.join(sources)}: no documents (empty source)")
            raise DataError(
                f"{', '.join(sources)}: the {split} split is empty ({n_docs} documents, --val-fraction "
                f"{val_fraction}); give more documents or change --val-fraction"
            )
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
        }
    fp = hashlib.sha256(f"{PREPARED_FORMAT}\0{tok.sha256}\0{tok.eot_id}\0".encode())
    for split in ("train", "val"):
        fp.update(split.encode() + b"\0" + "".join(s["sha256"] for s in splits[split]["shards"]).encode())
    return {
        "format": PREPARED_FORMAT,
        "tokenizer": {
            "name": tok.name,
            "kind": "bytes" if tok.json is None else ("trained" if train_vocab else "file"),
            "source": tokenizer if train_vocab is None else None,
            "file": TOKENIZER_FILE if tok.json is not None else None,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eot": tok.eot,
            "eot_id": tok.eot_id,
        },
        "dtype": f"uint{8 * itemsize}",
        "bytes_per_token": splits["val"]["bytes"] / splits["val"]["tokens"],
        "split": {
            "rule": "document i (0-based over all sources in order) is validation when "
            "floor((i + o + 1) * val_fraction) > floor((i + o) * val_fraction), o from the seed",
            "val_fraction": val_fraction,
            "seed": seed,
        },
        "fingerprint": fp.hexdigest()[:16],
        "sources": list(sources),
        "text_field": text_field,
        "splits": splits,
        "config": config,
    }
