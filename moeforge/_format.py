"""Numbers for people: 16.38B parameters, 75.9T FLOPs, 31.2 GiB."""

from __future__ import annotations


def count(n: float, digits: int = 4) -> str:
    """Short form with 4 significant digits: 16375728128 -> '16.38B'."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.{max(digits - len(str(int(abs(v)))), 0)}f}{suffix}"
    return f"{n:g}"


def nbytes(n: float) -> str:
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{int(n)} B"


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
