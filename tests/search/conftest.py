from pathlib import Path

import pytest
from moeforge.search import load_search

DEBUG_PAPER = """\
name: {name}
base:
  base: debug
  moe: {{paper: {{experts: 4, top_k: 1, m: 1, shared: 0}}}}
space:
{space}
budget: {{train_flops: {budget}}}
sampler: {{kind: {sampler}, seed: 0}}
n_trials: {n_trials}
{extra}
"""


@pytest.fixture
def make_search(tmp_path: Path):
    """Write a search spec on the debug model (paper form) and load it."""

    def make(
        space: str = "  granularity: [1, 2, 4]\n  shared: [0, 1]",
        *,
        name: str = "t",
        budget: str = "1.0e+9",
        sampler: str = "grid",
        n_trials: int = 4,
        extra: str = "",
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            DEBUG_PAPER.format(
                name=name, space=space, budget=budget, sampler=sampler, n_trials=n_trials, extra=extra
            )
        )
        return load_search(path)

    return make
