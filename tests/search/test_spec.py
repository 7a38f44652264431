"""Search spec loading: train.options are checked against runtime.TrainConfig when the spec loads."""

from pathlib import Path

import pytest
from moeforge.compiler import SpecError
from moeforge.search._spec import train_config

from moeforge.cli import main


def _option_at(path: Path, key: str) -> str:
    """'file:line:col' of `key:` on the file's `options:` line (1-based, as SpecError reports)."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if "options:" in line:
            return f"{path}:{i}:{line.index(key + ':', line.index('options:') + 8) + 1}"
    raise AssertionError(f"no options line in {path}")


@pytest.mark.parametrize(
    ("options", "key", "what"),
    [
        ("{eval_tokns: 1024}", "eval_tokns", "did you mean 'eval_tokens'"),
        ("{warmup: 1e-3}", "warmup", "must be a number (got '1e-3'); YAML reads 1e-3 as text"),
        ("{compile: 1}", "compile", "must be true or false"),
        ("{schedule: cosin}", "schedule", "did you mean 'cosine'"),
        ("{eval_tokens: 1024, seed: 3}", "seed", "set by the search; use seeds"),
        ("{tokens: 100}", "tokens", "use budget.train_flops"),
        ("{batch_size: 8}", "batch_size", "use train.batch_size"),
        ("{micro_batch_size: 8}", "micro_batch_size", "8 is larger than batch_size 4"),
        ("{warmup: 1.5}", "warmup", "must be a fraction"),
    ],
)
def test_bad_train_options_are_located_spec_errors(make_search, tmp_path, options, key, what):
    with pytest.raises(SpecError) as e:
        make_search(extra=f"train:\n  batch_size: 4\n  options: {options}")
    [problem] = e.value.problems
    assert str(problem).startswith(f"{_option_at(tmp_path / 't.yaml', key)}: train.options.{key}: ")
    assert what in problem.message


def test_good_train_options_reach_the_trainer_config(make_search):
    search = make_search(extra="train:\n  lr: 0.01\n  options: {eval_tokens: 1024, warmup: 0, time_s: 60}")
    cfg = train_config(search, budget_flops=2e9, seed=7, device="cpu")
    assert (cfg.eval_tokens, cfg.warmup, cfg.time_s, cfg.lr) == (1024, 0, 60, 0.01)
    assert (cfg.budget_flops, cfg.seed, cfg.device, cfg.eval_points) == (
        2e9,
        7,
        "cpu",
        search.train.eval_points,
    )


def test_unknown_train_option_exits_2_from_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "base: debug\nspace: {params: {d_ff: {categorical: [64, 128]}}}\nbudget: {train_flops: 1.0e+9}\n"
        "n_trials: 1\ntrain:\n  options: {eval_token: 8192}\n"
    )
    assert main(["search", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{_option_at(path, 'eval_token')}: train.options.eval_token: unknown key; did you mean 'eval_tokens'?"
        in err
    )
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ plain-list shorthand
def test_a_plain_list_is_categorical(make_search):
    from moeforge.search import grid_space, search_schema, trial_to_spec
    from moeforge.search._spec import CategoricalParam

    short = make_search(
        "  params:\n    moe.balance.expert_alpha: [0.0, 0.01]\n    ffn.activation: [swiglu, gelu]"
    )
    long = make_search(
        "  params:\n    moe.balance.expert_alpha: {categorical: [0.0, 0.01]}\n"
        "    ffn.activation: {categorical: [swiglu, gelu]}",
        name="long",
    )
    assert short.space == long.space
    assert short.space.params["ffn.activation"] == CategoricalParam(categorical=("swiglu", "gelu"))
    assert grid_space(short) == {
        "moe.balance.expert_alpha": [0.0, 0.01],
        "ffn.activation": ["swiglu", "gelu"],
    }
    spec = trial_to_spec(short, {"moe.balance.expert_alpha": 0.01, "ffn.activation": "gelu"})
    assert (spec.moe.balance.expert_alpha, spec.ffn.activation) == (0.01, "gelu")
    # editors see the shorthand too: the schema's distribution accepts an array of choices
    dist = search_schema()["$defs"]["SpaceSpec"]["properties"]["params"]["additionalProperties"]
    arrays = [alt for alt in dist["oneOf"] if alt.get("type") == "array"]
    assert len(arrays) == 1 and arrays[0]["minItems"] == 1


@pytest.mark.parametrize(
    ("value", "where", "message"),
    [
        ("[]", "", "give at least 1 item (got [])"),
        ("[swiglu, {a: 1}]", "[1]", "must be true or false, a number or a string (got {'a': 1})"),
        ("{categorical: [swiglu, [gelu]]}", ".categorical[1]", "must be true or false, a number or a string"),
        ("swiglu", "", "expected a list of choices [a, b, ...], or one of {int: {low, high}}"),
    ],
)
def test_bad_choices_are_one_located_line(make_search, tmp_path, value, where, message):
    with pytest.raises(SpecError) as e:
        make_search(f"  params:\n    ffn.activation: {value}")
    [problem] = e.value.problems
    assert problem.key == f"space.params.ffn.activation{where}"
    assert message in problem.message
    line = (tmp_path / "t.yaml").read_text().splitlines()[problem.loc.line - 1]
    assert line.startswith("    ffn.activation:")


# ------------------------------------------------------------------------ MoE form of an inline base
def test_an_inline_base_switches_moe_form_without_nulls(tmp_path):
    from moeforge.search import load_search

    assert load_search("quickstart").base["moe"] == {
        "paper": {"experts": 4, "top_k": 1, "m": 1, "shared": 0},
        "balance": {"expert_alpha": 0.01},
    }
    path = tmp_path / "fine.yaml"
    path.write_text(
        "base:\n  base: deepseekmoe-2b\n  moe: {routed_experts: 15, top_k: 3, expert_hidden: 1280}\n"
        "space: {params: {moe.top_k: [3, 5]}}\nbudget: {train_flops: 1.0e+9}\nn_trials: 2\n"
    )
    moe = load_search(path).base["moe"]
    assert "paper" not in moe and (moe["routed_experts"], moe["top_k"]) == (15, 3)
    path.write_text(path.read_text().replace("top_k: 3,", "top_k: 30,"))
    with pytest.raises(SpecError) as e:
        load_search(path)
    [problem] = e.value.problems
    assert str(problem).startswith(f"{path}:3:29: base.moe.top_k: 30 > routed experts 15")


def test_bits_per_byte_on_token_files_is_rejected_at_load(make_search, tmp_path):
    import numpy as np
    from moeforge.runtime import write_token_file

    write_token_file(tmp_path / "tokens.bin", np.arange(5000, dtype=np.uint16) % 256)
    with pytest.raises(SpecError) as e:
        make_search(
            extra=f"objective: {{metric: val_bits_per_byte}}\ntrain: {{data: {tmp_path / 'tokens.bin'}}}"
        )
    (p,) = e.value.problems
    lines = (tmp_path / "t.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith("objective:"))
    assert p.key == "objective.metric" and (p.loc.line, p.loc.col) == (
        line,
        lines[line - 1].index("metric") + 1,
    )
    assert "bytes behind each token" in p.message
    make_search(extra=f"objective: {{metric: val_loss}}\ntrain: {{data: {tmp_path / 'tokens.bin'}}}")
