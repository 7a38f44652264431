"""The two ways a search reports a problem: a trial that cannot finish, and a run that cannot go on."""

from __future__ import annotations


class TrialFailed(Exception):
    """A trial that cannot finish; evaluators raise it to give a clean one-line reason."""


class SearchStop(Exception):
    """A problem with the run itself (storage, a study of another search); one line for the user."""
