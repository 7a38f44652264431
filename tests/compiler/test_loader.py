"""The located YAML reader: composition (`base:`), `--set` overrides, strictness, shipped names, schema file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moeforge.compiler import SpecError, load_spec, model_schema, resolve, shipped_dir, shipped_names
from moeforge.compiler._loader import parse_yaml
from moeforge.compiler._spec import GQASpec, MHASpec

BASE = """\
name: base
vocab_size: 256
d_model: 64
n_layers: 4
seq_len: 128
attention: {kind: gqa, n_heads: 4, n_kv_heads: 2, head_dim: 16}
ffn: {activation: swiglu, hidden: 128}
moe:
  first_dense: 1
  routed_experts: 8
  shared_experts: 1
  top_k: 2
  expert_hidden: 32
  balance: {expert_alpha: 0.01}
"""


def write(dir: Path, name: str, text: str) -> Path:
    path = dir / name
    path.write_text(text)
    return path


def problems(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return [str(p) for p in exc.value.problems]


# ---------------------------------------------------------------------------------------- composition
def test_child_overrides_a_scalar_and_inherits_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\nd_model: 128\n")
    spec = load_spec(child)
    assert (spec.name, spec.d_model, spec.n_layers) == ("child", 128, 4)
    assert spec.moe is not None and spec.moe.routed_experts == 8


def test_nested_sections_merge_key_by_key(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmoe: {top_k: 3, balance: {device_alpha: 0.05}}\n")
    moe = load_spec(child).moe
    assert moe is not None
    assert (moe.top_k, moe.routed_experts, moe.first_dense) == (3, 8, 1)
    assert (moe.balance.expert_alpha, moe.balance.device_alpha) == (0.01, 0.05)


def test_a_new_kind_replaces_the_section_instead_of_merging(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nattention: {kind: mha, n_heads: 8}\n")
    att = load_spec(child).attention
    assert isinstance(att, MHASpec)
    assert (att.n_heads, att.head_dim) == (8, None)  # head_dim of the gqa base is not carried over
    same = write(tmp_path, "same.yaml", "base: base.yaml\nattention: {kind: gqa, n_heads: 8}\n")
    att2 = load_spec(same).attention
    assert isinstance(att2, GQASpec) and (att2.n_heads, att2.n_kv_heads, att2.head_dim) == (8, 2, 16)


def test_null_removes_an_inherited_section(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    dense = write(tmp_path, "dense.yaml", "base: base.yaml\nmoe: null\n")
    assert load_spec(dense).moe is None


def test_a_child_in_paper_form_replaces_the_base_fine_grained_numbers(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmoe: {paper: {experts: 4, top_k: 1, m: 2}}\n")
    spec = load_spec(child)
    assert spec.moe is not None and spec.moe_derived is not None
    assert (spec.moe.routed_experts, spec.moe.shared_experts, spec.moe.top_k, spec.moe.expert_hidden) == (
        None,
        None,
        None,
        None,
    )
    d = spec.moe_derived
    assert (d.routed_experts, d.shared_experts, d.top_k, d.expert_hidden, d.m) == (8, 0, 2, 64, 2)
    assert (spec.moe.first_dense, spec.moe.balance.expert_alpha) == (1, 0.01)  # the rest is inherited


def test_a_child_in_fine_grained_form_replaces_the_base_paper_form(tmp_path: Path) -> None:
    paper = BASE.replace(
        "  routed_experts: 8\n  shared_experts: 1\n  top_k: 2\n  expert_hidden: 32\n",
        "  paper: {experts: 4, top_k: 1, m: 2, shared: 1}\n",
    )
    write(tmp_path, "base.yaml", paper)
    assert load_spec(tmp_path / "base.yaml").moe.paper is not None  # type: ignore[union-attr]
    child = write(
        tmp_path, "child.yaml", "base: base.yaml\nmoe: {routed_experts: 16, top_k: 4, expert_hidden: 16}\n"
    )
    spec = load_spec(child)
    assert spec.moe is not None and spec.moe.paper is None
    d = spec.moe_derived
    assert d is not None and (d.routed_experts, d.shared_experts, d.top_k, d.expert_hidden) == (16, 0, 4, 16)
    # one fine-grained key is enough to switch; the others then come from the child or their defaults
    one = write(tmp_path, "one.yaml", "base: base.yaml\nmoe: {top_k: 4}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(one)
    [line] = problems(exc)
    assert line.startswith(f"{one}:2:1: moe.routed_experts: missing")


def test_a_child_that_writes_both_forms_keeps_both_and_they_must_agree(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    paper = "paper: {experts: 4, top_k: 1, m: 2}"
    agree = write(
        tmp_path,
        "agree.yaml",
        f"base: base.yaml\nmoe: {{{paper}, routed_experts: 8, shared_experts: 0, top_k: 2, expert_hidden: 64}}\n",
    )
    moe = load_spec(agree).moe
    assert moe is not None and moe.paper is not None and (moe.routed_experts, moe.expert_hidden) == (8, 64)
    # both forms given: the base's other fine-grained numbers stay, and must agree too
    partial = write(
        tmp_path, "partial.yaml", f"base: base.yaml\nmoe: {{{paper}, routed_experts: 8, top_k: 2}}\n"
    )
    with pytest.raises(SpecError) as exc:
        load_spec(partial)
    assert [line.split(" contradicts")[0] for line in problems(exc)] == [
        f"{base}:11:3: moe.shared_experts: 1",
        f"{base}:13:3: moe.expert_hidden: 32",
    ]


def test_switching_forms_keeps_no_locations_from_the_replaced_form(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmoe: {paper: {experts: 4, top_k: 5}}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(child)
    assert problems(exc) == [f"{child}:2:27: moe.paper.top_k: 5 > experts 4; top_k must be <= experts"]


def test_chains_and_shipped_names_as_base(tmp_path: Path) -> None:
    write(tmp_path, "mid.yaml", "base: debug\nn_layers: 3\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    leaf = write(sub, "leaf.yaml", "base: ../mid.yaml\nname: leaf\n")
    spec = load_spec(leaf)
    debug = load_spec("debug")
    assert (spec.name, spec.n_layers, spec.d_model) == ("leaf", 3, debug.d_model)
    assert spec.moe == debug.moe


def test_problems_point_into_the_file_that_wrote_the_value(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE.replace("top_k: 2", "top_k: 20"))
    child = write(tmp_path, "child.yaml", "base: base.yaml\nd_model: 0\n")
    with pytest.raises(SpecError) as exc:
        load_spec(child)
    assert problems(exc) == [f"{child}:2:1: d_model: must be greater than 0 (got 0)"]
    fixed = write(tmp_path, "fixed.yaml", "base: base.yaml\nname: fixed\n")
    with pytest.raises(SpecError) as exc:
        load_spec(fixed)
    [line] = problems(exc)
    assert line.startswith(f"{base}:12:3: moe.top_k: 20 > routed experts 8")


def test_replaced_section_keeps_no_locations_from_the_base(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "name: c\nbase: base.yaml\nattention: {kind: mha, n_heads: 5}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(child)
    [line] = problems(exc)
    assert line.startswith(f"{child}:3:24: attention.n_heads: 5 does not divide d_model 64")


def test_base_problems(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nbase: a.yaml\n")
    with pytest.raises(SpecError) as exc:
        load_spec(a)
    assert problems(exc) == [
        f"{tmp_path / 'b.yaml'}:2:1: base: 'a.yaml' makes a cycle (a.yaml -> b.yaml -> a.yaml); remove one `base:`"
    ]
    typo = write(tmp_path, "typo.yaml", "base: deepseekmoe-16\n")
    with pytest.raises(SpecError) as exc:
        load_spec(typo)
    assert problems(exc) == [
        f"{typo}:1:1: base: 'deepseekmoe-16': no such file or shipped spec; did you mean 'deepseekmoe-16b'?"
    ]


# ------------------------------------------------------------------------------------------ overrides
def test_overrides_are_typed_and_nested() -> None:
    spec = load_spec(
        "debug",
        [
            "moe.top_k=3",
            "norm.eps=1.0e-5",
            "tie_embeddings=true",
            "name=tuned",
            "moe.layers=[1]",
            "moe.gate.normalize_topk=true",
            "attention={kind: gqa, n_heads: 4, n_kv_heads: 2}",
        ],
    )
    assert spec.moe is not None
    assert (spec.moe.top_k, spec.norm.eps, spec.tie_embeddings, spec.name) == (3, 1e-5, True, "tuned")
    assert spec.moe.layers == (1,) and spec.moe_layers == (1,)
    assert spec.moe.gate.normalize_topk is True
    assert isinstance(spec.attention, GQASpec) and spec.attention.n_kv_heads == 2
    assert load_spec("debug", ["moe=null"]).moe is None
    assert load_spec("debug", ["moe.top_k=3", "moe.top_k=1"]).moe.top_k == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("moe.top_k=99", "<--set moe.top_k=99>:1:1: moe.top_k: 99 > routed experts 8; top_k must be <="),
        ("moe.topk=4", "<--set moe.topk=4>:1:1: moe.topk: unknown key; did you mean 'top_k'?"),
        ("d_model=abc", "<--set d_model=abc>:1:1: d_model: must be an integer (got 'abc')"),
        ("d_model=true", "<--set d_model=true>:1:1: d_model: must be an integer (got true)"),
        ("n_layers", "<--set n_layers>:1:1: n_layers: expected KEY=VALUE"),
        ("moe..top_k=1", "<--set moe..top_k=1>:1:1: moe..top_k: expected KEY=VALUE"),
        (
            "moe.layers=[0, 5",
            "<--set moe.layers=[0, 5>:1:17: moe.layers: YAML syntax error: expected ',' or ']'",
        ),
        (
            "attention={kind: gqa, n_heads: 4, n_kv_heads: 3}",
            "<--set attention={kind: gqa, n_heads: 4, n_kv_heads: 3}>:1:35: attention.n_kv_heads: 3 does not",
        ),
        (
            "name=!!python/object/apply:os.system [x]",
            "<--set name=!!python/object/apply:os.system [x]>:1:6: name:",
        ),
    ],
)
def test_bad_overrides_are_located_in_a_pseudo_file(override: str, expected: str) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec("debug", [override])
    assert len(exc.value.problems) == 1
    assert problems(exc)[0].startswith(expected), problems(exc)[0]


def test_override_problems_come_with_the_file_problems(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "base: debug\nd_model: -1\n")
    with pytest.raises(SpecError) as exc:
        load_spec(bad, ["moe.top_k=0"])
    assert problems(exc) == [
        f"{bad}:2:1: d_model: must be greater than 0 (got -1)",
        "<--set moe.top_k=0>:1:1: moe.top_k: must be greater than 0 (got 0)",
    ]


# --------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("true", "must be an integer (got true); true/false is not a number"),
        ("64.0", "must be an integer (got 64.0); write 64"),
        ('"64"', "must be an integer (got '64'); remove the quotes"),
        ("1.0e+30", "must be an integer (got 1e+30); write a whole number > 0 and <= 1048576"),
        (
            "1000000000000000000000000000000",
            "must be less than or equal to 1048576 (got 1000000000000000000000000000000)",
        ),
        ("[64]", "must be an integer (got [64])"),
    ],
)
def test_integers_are_strict(value: str, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec("debug", [f"d_model={value}"])
    assert problems(exc) == [f"<--set d_model={value}>:1:1: d_model: {message}"]


def test_all_problems_of_a_file_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "many.yaml",
        "name: m\nvocab_size: true\nd_model: 64\nd_model: 32\nn_layers: 0\nseq_len: 1e3\n"
        "attention: {kind: gqa, n_heads: 4, n_kv_head: 2}\nffn: {hidden: 128, activaton: relu}\n",
    )
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    keys = [p.key for p in exc.value.problems]
    assert keys == [
        "vocab_size",
        "d_model",
        "n_layers",
        "seq_len",
        "attention.n_kv_heads",
        "attention.n_kv_head",
        "ffn.activaton",
    ]
    assert [p.loc.line for p in exc.value.problems] == [2, 4, 5, 6, 7, 7, 8]
    assert "write it with a dot, e.g. 1.0e3" in exc.value.problems[3].message


# ------------------------------------------------------------------------------------------- reading
def test_reader_refuses_unsafe_and_unbounded_yaml() -> None:
    with pytest.raises(SpecError, match=r"f:1:1: YAML nested too deeply"):
        parse_yaml("[" * 1500 + "]" * 1500, "f")
    with pytest.raises(SpecError, match=r"f:1:4: a: YAML tag !!python/object/apply:os.system is not allowed"):
        parse_yaml("a: !!python/object/apply:os.system [echo]\n", "f")
    with pytest.raises(SpecError, match=r"f:1:4: a\[0\]: an alias refers to a value that contains it"):
        parse_yaml("a: &x [*x]\n", "f")
    data, locs = parse_yaml("a:\n  b: [1, {c: 2}]\n", "f")
    assert data == {"a": {"b": [1, {"c": 2}]}}
    assert (locs[("a", "b", 1, "c")].line, locs[("a", "b", 1, "c")].col) == (2, 11)


def test_duplicate_keys_at_any_depth_keep_the_first_value() -> None:
    soft: list = []
    data, _ = parse_yaml("a:\n  b:\n    c: 1\n    c: 2\n", "f", soft)
    assert data == {"a": {"b": {"c": 1}}}
    assert [str(p) for p in soft] == ["f:4:5: a.b.c: duplicate key (first given at line 3); keep one of them"]


# -------------------------------------------------------------------------------------- shipped names
def test_shipped_names_resolve_without_a_path() -> None:
    assert resolve("debug") == shipped_dir() / "debug.yaml"
    assert resolve("debug.yaml") == shipped_dir() / "debug.yaml"
    assert load_spec("deepseekmoe-16b").name == "deepseekmoe-16b"
    with pytest.raises(SpecError) as exc:
        resolve("ladder-m3-2b")
    assert problems(exc)[0].startswith(
        "ladder-m3-2b:1:1: no such file or shipped spec; did you mean 'ladder-m"
    )


# ------------------------------------------------------------------------------------------- schema
SCHEMA = shipped_dir().parent / "schema" / "model.schema.json"


def test_shipped_schema_file_is_current() -> None:
    assert json.loads(SCHEMA.read_text()) == model_schema(), (
        "specs/schema/model.schema.json is stale; regenerate it with: moeforge schema > specs/schema/model.schema.json"
    )


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_specs_point_editors_at_the_schema(name: str) -> None:
    first = (shipped_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schema/model.schema.json"


# ----------------------------------------------------------------------- cross-field checks on what parsed
THREE_PROBLEMS = Path(__file__).parent / "bad_specs" / "typo_wrong_type_and_top_k.yaml"


def test_a_typo_and_a_wrong_type_do_not_hide_the_cross_field_problems(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moeforge.cli import main

    assert main(["validate", str(THREE_PROBLEMS)]) == 2
    out, err = capsys.readouterr()
    f = THREE_PROBLEMS
    assert out == ""
    assert err.splitlines() == [
        f"{f}:15:3: moe.top_k: 12 > routed experts 8; top_k must be <= routed_experts",
        f"{f}:16:3: moe.expert_hiden: unknown key; did you mean 'expert_hidden'?",
        f"{f}:17:3: moe.shared_experts: must be an integer (got 'two')",
    ]


def test_a_section_that_fails_its_own_check_still_gets_the_cross_field_checks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gqa.yaml",
        BASE.replace("n_kv_heads: 2", "n_kv_heads: 3").replace("top_k: 2", "top_k: 9") + "  layers: [1, 7]\n",
    )
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    # n_kv_heads and the layer list are reported by their own sections' checks; top_k reads neither. (The
    # layer past the last one is not blamed while the list is already known to be wrong.)
    assert [p.key for p in exc.value.problems] == ["attention.n_kv_heads", "moe.top_k", "moe.layers"]
    assert "explicit list replaces first_dense" in exc.value.problems[2].message


def test_a_default_standing_in_for_a_bad_value_is_never_blamed(tmp_path: Path) -> None:
    # n_group is unreadable: the check of topk_group against n_group cannot be known (the default 1 would
    # make it fail); the shared-gate check reads neither and is reported.
    path = write(
        tmp_path,
        "gate.yaml",
        BASE.replace("shared_experts: 1", "shared_experts: 0")
        + '  gate: {n_group: "2", topk_group: 2}\n  shared_gate: true\n',
    )
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert [(p.key, p.loc.line) for p in exc.value.problems] == [
        ("moe.gate.n_group", 15),
        ("moe.shared_gate", 16),
    ]


def test_every_cross_field_problem_says_what_its_check_reads() -> None:
    # A key missing from CHECK_READS would be dropped silently from the second pass.
    import re

    import moeforge.compiler._spec as spec_module
    from moeforge.compiler._spec import CHECK_READS

    source = Path(spec_module.__file__).read_text()
    written = set(re.findall(r'f?"((?:attention|moe)\.[a-z_.]+):', source))
    written |= {f"moe.{k}" for k in ("routed_experts", "shared_experts", "top_k", "expert_hidden", "layers")}
    written |= {"attention.n_kv_heads"}
    assert len(written) >= 18
    assert written <= set(CHECK_READS)
