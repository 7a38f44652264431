"""Fixtures of the runtime tests: the debug model's spec, its training FLOPs per token, and the bundled
corpus (built once per module in a temp cache)."""

import pytest
from moeforge.compiler import account, load_spec
from moeforge.runtime import load_corpus


@pytest.fixture(scope="module")
def spec():
    return load_spec("debug")


@pytest.fixture(scope="module")
def fpt(spec) -> int:
    return account(spec).train_flops_per_token


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, spec):
    return load_corpus(cache_dir=tmp_path_factory.mktemp("cache"), vocab_size=spec.vocab_size)
