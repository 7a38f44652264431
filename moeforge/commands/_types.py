"""argparse types: every command-line value is checked here, once, at the boundary.

A type raises `argparse.ArgumentTypeError` with the accepted range; argparse prefixes the flag's name, and
`moeforge.cli` prints it as one line (``moeforge train: --lr: must be a finite number > 0 (got 'inf')``),
exit 2. Commands then receive values they can use as they are.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

SEED_MAX = 2**32 - 1
"""numpy's and torch's seeds are 32-bit unsigned."""
MAX_THREADS = max(os.cpu_count() or 1, 1)
"""More torch threads than cores only adds contention (100000 segfaults, 5000 hangs)."""


def _bad(text: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {what} (got {text!r})")


def positive_float(text: str) -> float:
    """A finite number > 0 (budgets, learning rates, times)."""
    try:
        v = float(text)
    except ValueError:
        raise _bad(text, "a finite number > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise _bad(text, "a finite number > 0")
    return v


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        raise _bad(text, "a number in (0, 1)") from None
    if not 0 < v < 1:
        raise _bad(text, "a number in (0, 1)")
    return v


def unit_interval(text: str) -> float:
    """A number in [0, 1] (fractions of a run where both ends mean something, e.g. a cooldown)."""
    try:
        v = float(text)
    except ValueError:
        raise _bad(text, "a number in [0, 1]") from None
    if not 0 <= v <= 1:
        raise _bad(text, "a number in [0, 1]")
    return v


def int_in(lo: int, hi: int, *, floats: bool = False) -> Callable[[str], int]:
    """An integer in [lo, hi]; with `floats`, also written like 5e6 (a whole number)."""
    what = f"an integer in [{lo}, {hi:,}]" if hi < 10**7 else f"an integer in [{lo}, {hi:.0e}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            if not floats:
                raise _bad(text, what) from None
            try:
                f = float(text)
            except ValueError:
                raise _bad(text, what) from None
            if not (math.isfinite(f) and f == int(f)):
                raise _bad(text, what) from None
            v = int(f)
        if not lo <= v <= hi:
            raise _bad(text, what)
        return v

    parse.__name__ = "integer"
    return parse


seed = int_in(0, SEED_MAX)
seed.__name__ = "seed"


def threads(text: str) -> int:
    """CPU threads: 1 to this machine's cores."""
    return int_in(1, MAX_THREADS)(text)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, as the help says (whether it exists here is checked when it is used)."""
    if not _DEVICE.match(text):
        raise _bad(text, "auto, cpu, cuda or cuda:N")
    return text


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def storage(text: str) -> str:
    """An Optuna storage: sqlite:///FILE, postgresql://..., mysql://... (with +driver), or a journal file."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if m:
        if m[1].split("+")[0].lower() not in STORAGE_SCHEMES:
            raise _bad(text, "sqlite:///FILE, postgresql://..., mysql://... or a journal file path")
        return text
    if not text or (Path(text).exists() and not Path(text).is_file()):
        raise _bad(text, "sqlite:///FILE, postgresql://..., mysql://... or a journal file path")
    return text


def out_dir(text: str) -> str:
    """A folder to write into: absent (it is made) or a folder, never an existing file."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (new or existing)")
    if not p.exists() and any(q.exists() and not q.is_dir() for q in p.parents):
        raise argparse.ArgumentTypeError(f"{text}: a parent is a file, not a folder")
    return text


def positive_floats(text: str) -> str:
    """A comma-separated list of finite numbers > 0, returned as given (the command splits it)."""
    parts = [x for x in text.split(",") if x.strip()]
    if not parts:
        raise _bad(text, "finite numbers > 0, comma-separated (1,2,4)")
    for x in parts:
        try:
            v = float(x)
        except ValueError:
            raise _bad(text, "finite numbers > 0, comma-separated (1,2,4)") from None
        if not (math.isfinite(v) and v > 0):
            raise _bad(text, "finite numbers > 0, comma-separated (1,2,4)")
    return text
