"""The data a search trains on: loading its corpus, what a spec needs of it (checked before anything is
built), and what a study and each trial record about it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeforge.compiler import ModelSpec

from ._errors import SearchStop
from ._spec import SearchSpec

if TYPE_CHECKING:
    from moeforge.runtime import Corpus


def load_search_corpus(search: SearchSpec) -> Corpus:
    """The search's corpus (`train.data`), loaded without a vocabulary so each spec is checked against it."""
    from moeforge.runtime import DataError, load_corpus  # imports torch: only where data is loaded

    try:
        return load_corpus(search.train.data)
    except DataError as e:
        raise SearchStop(f"train.data: {e}") from None


def data_problem(search: SearchSpec, spec: ModelSpec, corpus: Corpus) -> str | None:
    """Why `spec` cannot train on `corpus` (checked before anything is built), or None."""
    if spec.vocab_size < corpus.min_vocab_size:
        return (
            f"vocab_size {spec.vocab_size} is smaller than the data's token range "
            f"({corpus.min_vocab_size} ids, {corpus.level}-level {corpus.name})"
        )
    if len(corpus.val) < spec.seq_len + 1:
        return (
            f"seq_len {spec.seq_len} needs {spec.seq_len + 1} validation tokens; the data has "
            f"{len(corpus.val)}"
        )
    if len(corpus.train) < spec.seq_len + 1:
        return f"seq_len {spec.seq_len} needs {spec.seq_len + 1} training tokens; the data has {len(corpus.train)}"
    if search.objective.metric == "val_bits_per_byte" and corpus.bytes_per_token is None:
        return f"val_bits_per_byte needs bytes per token, unknown for {corpus.name}"
    return None


def data_record(corpus: Corpus) -> dict[str, Any]:
    """What a study and each trial record about the data they train on."""
    return {
        "fingerprint": corpus.fingerprint,
        "name": corpus.name,
        "level": corpus.level,
        "train_tokens": len(corpus.train),
        "val_tokens": len(corpus.val),
    }
