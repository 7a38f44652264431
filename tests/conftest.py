"""Test-wide settings.

Hypothesis runs derandomized by default so CI is reproducible: the same examples every run. Set
HYPOTHESIS_PROFILE=explore to draw fresh examples (and more of them) when hunting bugs.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is fastest and keeps runs comparable.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _few_steps_allowed(monkeypatch):
    """The suite trains runs of a few steps for speed, below the budget floor users get (runtime MIN_STEPS,
    20 full batches); MOEFORGE_MIN_STEPS=0 lifts it here and in every process a test starts. Tests of the
    floor itself remove the variable (``monkeypatch.delenv("MOEFORGE_MIN_STEPS")``)."""
    monkeypatch.setenv("MOEFORGE_MIN_STEPS", "0")
