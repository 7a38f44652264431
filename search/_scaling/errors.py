"""The two ways a scaling fit stops: the user's data (a one-line message, exit 2), or the optimizer (exit 1)."""

from __future__ import annotations


class ScalingInputError(ValueError):
    """The data cannot be fitted as given (a one-line message for the user; exit 2)."""


class FitFailed(RuntimeError):
    """No start of the optimizer converged (exit 1)."""
