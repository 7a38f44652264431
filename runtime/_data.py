"""Token data: a bundled corpus that needs no download, user text, and nanoGPT-style token files.

Every source ends up as 1-D token arrays read through np.memmap, in one on-disk format: the
nanoGPT / modded-nanogpt `.bin` file, a 256 x int32 header (magic 20240520, version 1, n_tokens, rest
zero) followed by n_tokens little-endian uint16 tokens. Our own caches use the same format. Version 2 is the
same with header[3] = bytes per token (2 or 4), for vocabularies beyond uint16 (`moeforge data prepare`).

Sources, as `load_corpus` reads them:
- None, "bundled" or "bundled:stdlib": the Python standard library's own `*.py` sources (real text on every
  machine with Python), byte-level (vocab 256). Built once into the cache dir, keyed by a hash of the file
  list and sizes, so a different Python gets a different cache file. Split by document: a file goes to
  validation when crc32 of its relative path is 0 mod 20 (about 5%), so the split never depends on order.
- a text file or a folder of text files: byte-level, concatenated in sorted path order, cached by content
  hash; the last 5% of tokens (at least `_MIN_VAL_TOKENS`, at most half) is validation.
- a `.bin` token file: same tail split. A folder or glob pattern of `.bin` files: `*train*.bin` and
  `*val*.bin`; several shards of one split are joined once into a cached token file.
- a folder made by `moeforge data prepare` (it holds `meta.json`): its `train/` and `val/` shards, read in
  place as one stream per split; tokenizer, vocabulary, bytes per token and fingerprint come from meta.json.

Byte-level data has `bytes_per_token == 1.0`, so bits per byte = loss_nats / ln 2; for token files the
bytes behind each token are unknown and `bytes_per_token` is None.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import math
import os
import sysconfig
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1  # uint16 tokens, as nanoGPT writes them
VERSION_WIDE = 2  # header[3] = bytes per token, 2 or 4
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_VOCAB_SIZE = 50257
BYTE_VOCAB_SIZE = 256

BUNDLED_NAME = "bundled:stdlib"
_BUNDLED_MAX_BYTES = 16 * 2**20  # caps build time at a few seconds
_BUNDLED_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
_VAL_EVERY = 20  # one document (bundled) or 1/20 of the tokens (everything else) is validation
_MIN_VAL_TOKENS = 2049  # one 2048-token sequence plus its target, when the data allows
_CACHE_FORMAT = "v1"  # bump when what goes into a cache file changes


class DataError(Exception):
    """Data is missing, empty, corrupt or too small; the message is one line meant for the user."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Train and validation token streams of one source."""

    name: str
    """"bundled:stdlib" or the path (or pattern) the data came from."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    train: np.ndarray | TokenStream = field(repr=False)
    """1-D memmap of uint16 token ids."""
    val: np.ndarray | TokenStream = field(repr=False)
    """1-D memmap of uint16 token ids, disjoint from `train`."""
    bytes_per_token: float | None = None
    """Bytes of text per token: 1.0 for byte-level data, None where unknown (token files)."""
    min_vocab_size: int = BYTE_VOCAB_SIZE
    """The smallest vocabulary that covers the data: 256 for byte-level data, the tokenizer's vocabulary for
    prepared data, the largest id + 1 otherwise."""
    tokenizer: str | None = None
    """The tokenizer's name for prepared data (`moeforge data prepare`); None otherwise."""
    prepared_fingerprint: str | None = field(default=None, repr=False)
    """The fingerprint meta.json records for prepared data; None otherwise."""

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, vocab_size={self.vocab_size}, train_tokens={len(self.train)}, "
            f"val_tokens={len(self.val)}, bytes_per_token={self.bytes_per_token})"
        )

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the token level and of every train and validation token: equal exactly when two
        machines would train and validate on the same data (the bundled corpus depends on the Python
        version's standard library, for one). Prepared data carries its own, computed once when written."""
        if self.prepared_fingerprint is not None:
            return self.prepared_fingerprint
        h = hashlib.sha256(f"{_CACHE_FORMAT}\0{self.level}\0{len(self.train)}\0{len(self.val)}\0".encode())
        for split in (self.train, self.val):
            for i in range(0, len(split), 1 << 24):  # chunks keep memory flat on large memmaps
                h.update(np.ascontiguousarray(split[i : i + (1 << 24)]).tobytes())
        return h.hexdigest()[:16]

    @property
    def level(self) -> str:
        """ "bytes" (byte-level text), the tokenizer's name (prepared data) or "tokens" (token files of an
        unknown tokenizer)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "bytes" if self.bytes_per_token == 1.0 else "tokens"

    def bits_per_byte(self, loss_nats: float) -> float | None:
        """Mean cross-entropy per token in nats -> bits per byte of text; None if bytes per token is unknown."""
        if self.bytes_per_token is None:
            return None
        return loss_nats / math.log(2) / self.bytes_per_token

    def sample_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of one split.

        Args:
            split: "train" or "val".
            batch_size: B, windows per batch.
            seq_len: T, tokens per window.
            generator: a CPU generator; it alone decides the offsets.

        Returns:
            x, y: int64 CPU tensors of shape [B, T], with y[:, t] == x[:, t + 1] within the stream.
        """
        data = self._split(split)
        _check_fits(self.name, split, len(data), seq_len)
        starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator).tolist()
        return _windows(data, starts, seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_tokens: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation batches: the same on every call.

        About max_tokens / seq_len windows of seq_len + 1 tokens, non-overlapping and spread evenly from
        the start to the end of the validation split (fewer if the split is smaller). The last batch may
        hold fewer than batch_size windows.
        """
        n, window = len(self.val), seq_len + 1
        _check_fits(self.name, "val", n, seq_len)
        n_windows = min(max(1, round(max_tokens / seq_len)), n // window)
        # consecutive starts are >= floor((n - window) / (n_windows - 1)) >= window apart, since
        # n >= n_windows * window; so windows never overlap and the last one ends at the split's end
        starts = [i * (n - window) // max(1, n_windows - 1) for i in range(n_windows)]
        return [
            _windows(self.val, starts[i : i + batch_size], seq_len) for i in range(0, n_windows, batch_size)
        ]

    def _split(self, split: str) -> np.ndarray | TokenStream:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _check_fits(name: str, split: str, n_tokens: int, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if n_tokens < seq_len + 1:
        raise DataError(
            f"{name}: the {split} split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1} "
            "needed for one sequence; use a shorter seq_len or more data"
        )


def _windows(
    data: np.ndarray | TokenStream, starts: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    buf_BT1 = torch.from_numpy(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    return buf_BT1[:, :-1].contiguous(), buf_BT1[:, 1:].contiguous()  # x, y: [B, T]


# ---------------------------------------------------------------------------------------------- token files


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, *, wide: bool = False) -> None:
    """Write 1-D token ids as a `.bin` token file, atomically: nanoGPT's uint16 format (ids in [0, 65536)),
    or with `wide` version 2 with uint32 ids."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    top = np.iinfo(np.uint32 if wide else np.uint16).max
    if tokens.size and (tokens.min() < 0 or tokens.max() > top):
        raise ValueError(f"token ids must be in [0, {top}], got [{tokens.min()}, {tokens.max()}]")
    _write_token_chunks(Path(path), len(tokens), [tokens], itemsize=4 if wide else 2)


def token_file_header(n_tokens: int, itemsize: int = 2) -> bytes:
    """The 1024-byte header of a token file of `n_tokens` ids of `itemsize` bytes (2: version 1, 4: version 2)."""
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 or 4, got {itemsize}")
    if n_tokens >= 2**31:
        raise ValueError(f"{n_tokens} tokens do not fit the header's int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION if itemsize == 2 else VERSION_WIDE, n_tokens)
    if itemsize == 4:
        header[3] = itemsize
    return header.tobytes()


def _write_token_chunks(path: Path, n_tokens: int, chunks: Iterable[np.ndarray], itemsize: int = 2) -> None:
    # tmp file in the same directory + os.replace: readers see the old file or the whole new one, and
    # concurrent writers of the same cache entry (worker processes) just replace each other's identical copy
    header = token_file_header(n_tokens, itemsize)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            written = 0
            for chunk in chunks:
                f.write(np.asarray(chunk).astype(f"<u{itemsize}", copy=False).tobytes())
                written += len(chunk)
            assert written == n_tokens, (written, n_tokens)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache dir should stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_token_file(path: str | os.PathLike) -> np.memmap:
    """Memory-map a `.bin` token file (uint16, or uint32 for version 2) after checking its header against
    its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such token file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read token file ({e.strerror})") from None
    if size < HEADER_BYTES:
        raise DataError(
            f"{path}: {size} bytes is too short for a token file's {HEADER_BYTES}-byte header "
            "(empty or truncated file)"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise DataError(
            f"{path}: not a token file: header magic is {magic}, expected {MAGIC} "
            "(nanoGPT/modded-nanogpt .bin: 256 x int32 header, then uint16 tokens)"
        )
    if version not in (VERSION, VERSION_WIDE):
        raise DataError(
            f"{path}: token file version {version} is not supported (expected {VERSION} or {VERSION_WIDE})"
        )
    itemsize = 2 if version == VERSION else int(header[3])
    if itemsize not in (2, 4):
        raise DataError(f"{path}: header says {itemsize} bytes per token; expected 2 or 4 (corrupt file)")
    expected = HEADER_BYTES + itemsize * n_tokens
    if n_tokens < 0 or size != expected:
        raise DataError(
            f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
            "it is truncated or corrupt"
        )
    if n_tokens == 0:
        raise DataError(f"{path}: token file holds no tokens")
    return np.memmap(path, dtype=f"<u{itemsize}", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# ---------------------------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    """`$MOEFORGE_CACHE`, else `~/.cache/moeforge`."""
    return Path(os.environ.get("MOEFORGE_CACHE") or "~/.cache/moeforge").expanduser()


def load_corpus(
    source: str | os.PathLike | None = None, *, cache_dir: Path | None = None, vocab_size: int | None = None
) -> Corpus:
    """Load (building and caching on first use) a corpus.

    Args:
        source: None, "bundled" or "bundled:stdlib" for the bundled corpus; a text file or folder of text
            files; a `.bin` token file; a folder or glob pattern of `*train*.bin` and `*val*.bin` files; or
            a folder made by `moeforge data prepare` (see `load_prepared`).
        cache_dir: where built token files go; default `default_cache_dir()`.
        vocab_size: the model's vocabulary; default 256 for byte-level data and 50257 (GPT-2, or more
            if the data's ids need it) for token files. Every token id must be below it.

    Raises:
        DataError: the data is missing, empty, corrupt or has ids outside the vocabulary.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source is None or str(source) in ("bundled", BUNDLED_NAME):
        return _byte_corpus(BUNDLED_NAME, *_bundled_stdlib(cache_dir), vocab_size)

    text = str(source)
    if glob.has_magic(text):
        return _bin_shards_corpus(
            text, sorted(Path(p) for p in glob.glob(os.path.expanduser(text))), vocab_size, cache_dir
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and (path / PREPARED_META).exists():
        return load_prepared(path, vocab_size=vocab_size)
    if path.is_dir():
        bins = sorted(path.glob("*.bin"))
        if bins:
            return _bin_shards_corpus(str(path), bins, vocab_size, cache_dir)
        train, val = _tail_split(_text_tokens(path, cache_dir))
        return _byte_corpus(str(path), train, val, vocab_size)
    if path.suffix == ".bin":
        tokens = read_token_file(path)
        train, val = _tail_split(tokens)
        return _token_corpus(str(path), train, val, vocab_size, _max_token(path, tokens, cache_dir))
    train, val = _tail_split(_text_tokens(path, cache_dir))
    return _byte_corpus(str(path), train, val, vocab_size)


def _byte_corpus(name: str, train: np.ndarray, val: np.ndarray, vocab_size: int | None) -> Corpus:
    if vocab_size is not None and vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"{name}: byte-level data needs vocab_size >= {BYTE_VOCAB_SIZE}, got {vocab_size}")
    return Corpus(name, vocab_size or BYTE_VOCAB_SIZE, train, val, bytes_per_token=1.0)


def _token_corpus(
    name: str, train: np.ndarray, val: np.ndarray, vocab_size: int | None, max_id: int
) -> Corpus:
    if vocab_size is not None and max_id >= vocab_size:
        raise DataError(
            f"{name}: token id {max_id} is outside the vocabulary of {vocab_size}; "
            f"pass vocab_size={max_id + 1} or more"
        )
    vocab_size = vocab_size or max(GPT2_VOCAB_SIZE, max_id + 1)
    return Corpus(name, vocab_size, train, val, bytes_per_token=None, min_vocab_size=max_id + 1)


def _tail_split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # last 1/20 is validation, at least one long sequence's worth, but never more than half
    n = len(tokens)
    n_val = min(max(math.ceil(n / _VAL_EVERY), _MIN_VAL_TOKENS), n // 2)
    return tokens[: n - n_val], tokens[n - n_val :]


def _bin_shards_corpus(name: str, paths: list[Path], vocab_size: int | None, cache_dir: Path) -> Corpus:
    paths = [p for p in paths if p.suffix == ".bin" and p.is_file()]
    if not paths:
        raise DataError(f"{name}: no .bin token files found")
    train_paths = [p for p in paths if "train" in p.name]
    val_paths = [p for p in paths if "val" in p.name]
    if not train_paths or not val_paths:
        raise DataError(
            f"{name}: a folder or pattern of token files needs both *train*.bin and *val*.bin files "
            f"(found {len(train_paths)} train, {len(val_paths)} val); pass a single .bin file to split it"
        )
    train = _joined_token_file(train_paths, cache_dir)
    val = _joined_token_file(val_paths, cache_dir)
    max_id = max(_max_token(p, read_token_file(p), cache_dir) for p in train_paths + val_paths)
    return _token_corpus(name, train, val, vocab_size, max_id)


def _max_token(path: Path, tokens: np.ndarray, cache_dir: Path) -> int:
    """The largest id in the token file at `path` (memory-mapped as `tokens`): scanned once, then read from a
    small record in the cache dir keyed by the file's resolved path, size and modification time, so a large
    file is not read whole at every load. A cache that cannot be written only costs the rescan."""
    import json

    st = path.stat()
    key = _hash_lines([f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}"])
    record = cache_dir / f"maxtoken-{key}.json"
    try:
        return int(json.loads(record.read_text())["max_token"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    max_id = _scan_max_token(tokens)
    tmp = None
    try:  # tmp file + os.replace, as for token files: concurrent loaders write the same record
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=record.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"file": str(path.resolve()), "max_token": max_id}, f)
        os.replace(tmp, record)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return max_id


def _scan_max_token(tokens: np.ndarray) -> int:
    """The largest id of a token array, reading all of it (the slow path `_max_token` does once per file)."""
    return max(int(tokens[i : i + (1 << 26)].max()) for i in range(0, len(tokens), 1 << 26))


def _joined_token_file(paths: list[Path], cache_dir: Path) -> np.memmap:
    # one shard is mapped in place; several are concatenated once into a cache file, so a split stays
    # one memmap (costs one copy on disk)
    shards = [read_token_file(p) for p in paths]  # checks every header first
    if len(shards) == 1:
        return shards[0]
    key = _hash_lines(f"{p.resolve()}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths)
    out = cache_dir / f"shards-{key}.bin"
    if not out.exists():
        _write_cache(out, sum(len(s) for s in shards), shards)
    return read_token_file(out)


def _text_tokens(path: Path, cache_dir: Path) -> np.memmap:
    """Byte-level tokens of a text file, or of a folder's text files in sorted path order, cached."""
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        docs = [(p.relative_to(path).as_posix(), _read_bytes(p)) for p in files]
        docs = [(rel, b) for rel, b in docs if b"\0" not in b[:8192]]  # binary files are not text
        if not docs:
            raise DataError(f"{path}: folder holds no text files")
    else:
        docs = [("", _read_bytes(path))]
    data = b"".join(b for _, b in docs)
    if not data:
        raise DataError(f"{path}: no text (0 bytes)")
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for rel, b in docs:
        h.update(f"{rel}\0{len(b)}\0".encode())
        h.update(b)
    out = cache_dir / f"text-{h.hexdigest()[:16]}.bin"
    if not out.exists():
        _write_cache(out, len(data), [np.frombuffer(data, dtype=np.uint8)])
    return read_token_file(out)


def _write_cache(path: Path, n_tokens: int, chunks: Iterable[np.ndarray]) -> None:
    try:
        _write_token_chunks(path, n_tokens, chunks)
    except OSError as e:
        raise DataError(
            f"{path}: cannot write cache file ({e.strerror}); set MOEFORGE_CACHE to a writable folder"
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _hash_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- prepared data

PREPARED_META = "meta.json"
PREPARED_FORMAT = "moeforge-tokens-v1"


class TokenStream:
    """Several token files read as one 1-D stream, in place: slicing reads only the pages it touches.

    Supports what `Corpus` needs of an array: `len`, `dtype` and slices with step 1 (which may cross files).
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        assert parts, "a stream needs at least one part"
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # starts[i] = offset of part i; [-1] = length
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream takes slices with step 1")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, pos = [], start
        for i in range(first, len(self.parts)):
            if pos >= stop:
                break
            lo, hi = pos - int(self.starts[i]), min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            out.append(self.parts[i][lo:hi])
            pos = int(self.starts[i]) + hi
        return out[0] if len(out) == 1 else np.concatenate(out)


def load_prepared(path: str | os.PathLike, *, vocab_size: int | None = None) -> Corpus:
    """A dataset folder made by `moeforge data prepare`: `meta.json`, `train/*.bin` and `val/*.bin`.

    Shards are memory-mapped, never read whole; `min_vocab_size` is the tokenizer's vocabulary,
    `bytes_per_token` the one measured on the validation split, `level` the tokenizer's name, and the
    fingerprint the one meta.json records.

    Raises:
        DataError: meta.json or a shard is missing or corrupt, or `vocab_size` is below the tokenizer's.
    """
    import json

    path = Path(path)
    meta_path = path / PREPARED_META
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as e:
        raise DataError(f"{meta_path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise DataError(f"{meta_path}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != PREPARED_FORMAT:
        raise DataError(f"{meta_path}: not a moeforge dataset (format is not {PREPARED_FORMAT!r})")
    try:  # a meta.json that is JSON but not ours, or edited by hand, is one located line too
        tok = meta["tokenizer"]
        need = int(tok["vocab_size"])
        if vocab_size is not None and vocab_size < need:
            raise DataError(
                f"{path}: vocab_size {vocab_size} does not cover the tokenizer's vocabulary of {need} "
                f"({tok['name']}); use vocab_size {need} or more"
            )
        splits = {}
        for split in ("train", "val"):
            shards = meta["splits"][split]["shards"]
            if not shards:
                raise DataError(f"{path}: the {split} split has no shards")
            parts = []
            for shard in shards:
                arr = read_token_file(path / split / shard["file"])
                if len(arr) != shard["tokens"]:
                    raise DataError(
                        f"{path / split / shard['file']}: holds {len(arr)} tokens, meta.json says {shard['tokens']}"
                    )
                parts.append(arr)
            splits[split] = parts[0] if len(parts) == 1 else TokenStream(parts)
        bytes_per_token, fingerprint = meta["bytes_per_token"], meta["fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: missing or bad field ({type(e).__name__}: {e})") from None
    return Corpus(
        str(path),
        vocab_size or need,
        splits["train"],
        splits["val"],
        bytes_per_token=bytes_per_token,
        min_vocab_size=need,
        tokenizer=tok["name"],
        prepared_fingerprint=fingerprint,
    )


# ---------------------------------------------------------------------------------------------- bundled corpus


def _stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its `*.py` files (sorted, tests and vendored packages skipped), up to the size cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _BUNDLED_SKIP_DIRS]  # prune: site-packages is large
        rel_dir = Path(dirpath).relative_to(root)
        candidates += [rel_dir / f for f in filenames if f.endswith(".py")]
    candidates.sort(key=lambda rel: rel.as_posix())
    files, total = [], 0
    for rel in candidates:
        size = (root / rel).stat().st_size
        if total + size > _BUNDLED_MAX_BYTES:
            break
        files.append(rel)
        total += size
    return root, files


def _is_val_document(rel: Path) -> bool:
    return zlib.crc32(rel.as_posix().encode()) % _VAL_EVERY == 0


def _bundled_stdlib(cache_dir: Path) -> tuple[np.memmap, np.memmap]:
    root, files = _stdlib_files()
    if not files:
        raise DataError(f"bundled corpus: no Python sources found under {root}")
    key = _hash_lines(f"{rel.as_posix()}\t{(root / rel).stat().st_size}" for rel in files)
    train_path, val_path = cache_dir / f"stdlib-{key}.train.bin", cache_dir / f"stdlib-{key}.val.bin"
    if not (train_path.exists() and val_path.exists()):
        _build_bundled(root, files, train_path, val_path)
    return read_token_file(train_path), read_token_file(val_path)


def _build_bundled(root: Path, files: list[Path], train_path: Path, val_path: Path) -> None:
    docs: dict[str, list[bytes]] = {"train": [], "val": []}
    for rel in files:
        docs["val" if _is_val_document(rel) else "train"].append(_read_bytes(root / rel))
    for split, out in (("val", val_path), ("train", train_path)):
        data = b"".join(docs[split])
        if not data:
            raise DataError(f"bundled corpus: the {split} split of {len(files)} files under {root} is empty")
        _write_cache(out, len(data), [np.frombuffer(data, dtype=np.uint8)])
