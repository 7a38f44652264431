"""`moeforge report / compare / schema`: what tools read from --json, and what people read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from moeforge.compiler import account, load_spec

from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_report_json_has_the_nested_keys(capsys: pytest.CaptureFixture[str]) -> None:
    rep = run_json(capsys, "report", "debug", "--json")
    acc = account(load_spec("debug"))
    P, F = rep["params"], rep["flops"]
    assert P["total"] == acc.params_total
    assert P["activated"] == acc.params_activated
    assert P["non_embedding"] == acc.params_non_embedding
    assert F["forward_per_token"] == acc.forward_flops_per_token
    assert F["train_per_token"] == 3 * F["forward_per_token"]
    assert F["train_per_sequence"] == F["train_per_token"] * F["seq_len"] == acc.train_flops_per_sequence
    d = rep["derived"]
    assert (d["routed_experts"], d["shared_experts"], d["top_k"], d["expert_hidden"]) == (8, 1, 2, 32)
    assert d["moe_layers"] == [0, 1]
    assert sum(v["total"] for v in P["by_component"].values()) == P["total"]
    assert (
        sum(layer["forward_per_token"] for layer in F["by_layer"]) + F["by_component"]["head"]
        == (F["forward_per_token"])
    )


def test_report_causal_halves_attention_core(capsys: pytest.CaptureFixture[str]) -> None:
    full = run_json(capsys, "report", "debug", "--json")["flops"]
    causal = run_json(capsys, "report", "debug", "--json", "--causal")["flops"]
    spec = load_spec("debug")
    core = 4 * spec.seq_len * spec.attention.n_heads * spec.head_dim * spec.n_layers
    assert causal["causal"] and not full["causal"]
    assert full["forward_per_token"] - causal["forward_per_token"] == core // 2


def test_report_measure_json_agrees_with_the_analytic_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    rep = run_json(capsys, "report", "debug", "--measure", "--json", "--set", "seq_len=32")
    m, P, F = rep["measured"], rep["params"], rep["flops"]
    assert m["seq_len"] == F["seq_len"] == 32
    assert m["params_total"] == P["total"]
    for key, analytic in (
        ("forward_flops_per_token", F["forward_per_token"]),
        ("train_flops_per_token", F["train_per_token"]),
        ("fvcore_forward_flops_per_token", F["forward_per_token"]),
    ):
        assert abs(m[key] - analytic) <= 0.005 * analytic, key


def test_report_measure_too_big_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeforge.compiler._measure as measure_module

    monkeypatch.setattr(measure_module, "_physical_memory", lambda: 1 << 20)
    assert main(["report", "debug", "--measure"]) == EXIT_FAIL
    err = capsys.readouterr().err
    assert "too big to measure" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_unknown_spec_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "no-such-spec", "--json"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and "no-such-spec" in captured.err and "Traceback" not in captured.err


def test_report_tables_print(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "debug", "--by", "layer"]) == 0
    out = capsys.readouterr().out
    assert "by layer" in out and "moe" in out
    assert main(["report", "deepseekmoe-16b"]) == 0
    out = capsys.readouterr().out
    assert "16.38B" in out and "by component" in out and "routed_experts" in out


def test_report_measure_table_shows_the_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "debug", "--measure", "--set", "seq_len=16"]) == 0
    out = capsys.readouterr().out
    assert "FlopCounterMode" in out and "fvcore" in out
    assert "+0.00% vs analytic" in out


def test_compare_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "gshard-2b", "deepseekmoe-2b"]) == 0
    out = capsys.readouterr().out
    assert "gshard-2b" in out and "deepseekmoe-2b" in out
    reps = run_json(capsys, "compare", "gshard-2b", "deepseekmoe-2b", "--json")
    assert [r["name"] for r in reps] == ["gshard-2b", "deepseekmoe-2b"]
    assert [r["derived"]["routed_experts"] for r in reps] == [16, 63]
    assert reps[0]["params"]["total"] == account(load_spec("gshard-2b")).params_total


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def test_schema_is_a_json_schema_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    schema = run_json(capsys, "schema")
    assert schema["type"] == "object"
    assert {"vocab_size", "d_model", "attention", "ffn", "moe"} <= set(schema["properties"])
    assert set(schema["required"]) >= {"vocab_size", "d_model", "n_layers", "seq_len", "attention", "ffn"}
    defs = schema.get("$defs", {})
    # every $ref resolves, every object's properties carry a description (through $ref for sections)
    for where, node in _walk(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/$defs/") and ref.split("/")[-1] in defs, where
        for name, prop in node.get("properties", {}).items() if node.get("type") == "object" else ():
            assert prop.get("description"), f"{where}/properties/{name} has no description"
    assert "DeepSeekMoE" in json.dumps(schema)  # the docs made it in


@pytest.mark.slow  # a fresh interpreter imports torch
def test_console_script_report_json() -> None:
    exe = shutil.which("moeforge") or str(Path(sys.executable).with_name("moeforge"))
    if not Path(exe).exists():
        pytest.skip("moeforge console script not installed")
    proc = subprocess.run([exe, "report", "debug", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["params"]["total"] == account(load_spec("debug")).params_total


NO_TORCH = """\
import sys
from moeforge.cli import main

assert main(["validate", "debug", "deepseek-v3", "quickstart"]) == 0
assert main(["report", "debug"]) == 0
assert main(["report", "deepseekmoe-16b", "--json", "--by", "layer"]) == 0
print("HEAVY", sorted(m for m in ("torch", "safetensors", "transformers", "fvcore") if m in sys.modules))
"""


def test_validate_and_report_never_import_torch() -> None:
    """The accounting is pure Python: checking and counting specs (search specs too) answer at once."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quickstart: ok (search quickstart)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "HEAVY []"


def test_report_says_tokens_per_parameter_and_epochs_of_the_data(capsys):
    from moeforge.compiler import account, load_spec

    acc = account(load_spec("debug"))
    assert main(["report", "debug", "--data", "bundled", "--budget-flops", "2e14", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert data["budget_tokens"] == int(2e14 // acc.train_flops_per_token)
    assert data["tokens_per_param"] == pytest.approx(data["train_tokens"] / acc.params_total)
    assert (
        data["epochs"] == pytest.approx(data["budget_tokens"] / data["train_tokens"]) and data["epochs"] > 1
    )
    assert main(["report", "debug", "--data", "bundled", "--budget-flops", "2e14"]) == 0
    out = capsys.readouterr().out
    assert "per parameter" in out and "(repeats the data)" in out
    assert main(["report", "debug", "--data", "/no/such/data"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_report_measure_group_limited_sigmoid_routing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # DeepSeek-V3's router (sigmoid scores, selection bias, group-limited routing) on the debug model: the
    # group mask once made fvcore's jit tracer fail (a bool scattered in place), a traceback from --measure.
    spec = tmp_path / "grouped.yaml"
    spec.write_text(
        "base: debug\nmoe:\n  gate: {score: sigmoid, selection_bias: true, n_group: 2, topk_group: 1}\n"
    )
    rep = run_json(capsys, "report", str(spec), "--measure", "--json", "--set", "seq_len=16")
    m, P, F = rep["measured"], rep["params"], rep["flops"]
    assert m["params_total"] == P["total"]
    assert m["forward_flops_per_token"] == F["forward_per_token"]
    assert m["train_flops_per_token"] == F["train_per_token"]
    assert m["fvcore_forward_flops_per_token"] == F["forward_per_token"]
