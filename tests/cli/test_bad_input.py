"""Bad input never escapes as a traceback: every problem is one located line and the exit status is 2.

The corpus in tests/compiler/bad_specs/ holds malformed specs. Each file starts with one or more lines
``# expect: [FILE@]LINE:COL: KEY: SUBSTRING``: `moeforge validate` must print exactly one line per
expectation, ``FILE:LINE:COL: KEY: ...`` with SUBSTRING in the message (KEY ``-`` for a problem with no key;
FILE, relative to the spec's folder, when the problem is in another file such as a base).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "compiler" / "bad_specs"
CORPUS = sorted(BAD.glob("*.yaml"))
EXPECT = re.compile(
    rb"^# expect: (?:(?P<file>[^@\s]+)@)?(?P<line>\d+):(?P<col>\d+): (?P<key>\S+): (?P<text>.+)$"
)
LINE_SHAPE = re.compile(r"^(?P<file>.+?):(?P<line>[1-9]\d*):(?P<col>[1-9]\d*): (?P<rest>\S.*)$")


def expectations(path: Path) -> list[tuple[str, str]]:
    """(prefix every matching line starts with, substring of its message) for each `# expect:` line."""
    out = []
    for raw in path.read_bytes().splitlines():
        m = EXPECT.match(raw)
        if not m:
            break
        file = path.parent / m["file"].decode() if m["file"] else path
        key = m["key"].decode()
        prefix = f"{file}:{int(m['line'])}:{int(m['col'])}: " + ("" if key == "-" else f"{key}: ")
        out.append((prefix, m["text"].decode()))
    return out


def test_corpus_is_big_and_every_file_says_what_it_expects() -> None:
    assert len(CORPUS) >= 40
    for path in CORPUS:
        assert expectations(path), f"{path.name}: first line must be `# expect: LINE:COL: KEY: message`"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_validate_reports_each_problem_located(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    lines = err.splitlines()
    for line in lines:
        m = LINE_SHAPE.match(line)
        assert m, f"not file:line:col: message: {line!r}"
        assert Path(m["file"]).is_file(), line
    expected = expectations(path)
    assert len(lines) == len(expected), f"expected {len(expected)} problems, got:\n{err}"
    unmatched = list(lines)
    for prefix, text in expected:
        hit = next((ln for ln in unmatched if ln.startswith(prefix) and text in ln[len(prefix) :]), None)
        assert hit is not None, f"no line starts with {prefix!r} and contains {text!r}:\n{err}"
        unmatched.remove(hit)


@pytest.mark.slow  # one process, but it imports torch
def test_console_script_over_the_whole_corpus_leaks_no_traceback() -> None:
    exe = shutil.which("moeforge") or str(Path(sys.executable).with_name("moeforge"))
    cmd = [exe] if Path(exe).is_file() else [sys.executable, "-m", "moeforge"]
    proc = subprocess.run([*cmd, "validate", *map(str, CORPUS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == sum(len(expectations(p)) for p in CORPUS)
    assert all(LINE_SHAPE.match(ln) for ln in lines)


# ------------------------------------------------------------------------------ files that are not specs
def _one_problem(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    line = _one_problem(["validate", str(missing)], capsys)
    assert line.startswith(f"{missing}:1:1: no such file or shipped spec")


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_problem(["validate", str(tmp_path)], capsys)
    assert line.startswith(f"{tmp_path}:1:1: is a directory, not a spec file")


def test_misspelled_shipped_name_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_problem(["validate", "deepseekmoe16b"], capsys)
    assert line == "deepseekmoe16b:1:1: no such file or shipped spec; did you mean 'deepseekmoe-16b'?"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    try:
        line = _one_problem(["validate", str(path)], capsys)
    finally:
        path.chmod(0o600)
    assert line == f"{path}:1:1: cannot read file: Permission denied; check its permissions"


def test_unreadable_file_even_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    line = _one_problem(["validate", str(path)], capsys)
    assert line == f"{path}:1:1: cannot read file: Permission denied; check its permissions"


def test_validate_prints_ok_files_and_fails_if_any_is_bad(capsys: pytest.CaptureFixture[str]) -> None:
    bad = BAD / "zero_layers.yaml"
    assert main(["validate", "debug", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "debug: ok (debug)\n"
    assert err.startswith(f"{bad}:5:1: n_layers: ")


def test_validate_json_lists_problems(capsys: pytest.CaptureFixture[str]) -> None:
    bad = str(BAD / "unknown_key_in_gqa.yaml")
    assert main(["validate", "--json", bad, "debug"]) == 2
    res = json.loads(capsys.readouterr().out)
    assert res["debug"] == {"ok": True, "kind": "model", "name": "debug", "problems": []}
    assert res[bad]["ok"] is False
    assert len(res[bad]["problems"]) == 2


# ------------------------------------------------------------------------------------------ search specs
SEARCHES = sorted((ROOT / "specs" / "searches").glob("*.yaml"))
SEARCH_TEXT = """\
name: s
base:
  base: debug
  moe: {paper: {experts: 4, top_k: 1}}
space: {granularity: [1, 2]}
budget: {train_flops: 1.0e+9}
n_trials: 2
"""


def test_validate_accepts_the_shipped_search_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(SEARCHES) >= 2
    assert main(["validate", *map(str, SEARCHES), "quickstart", "debug"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        *(f"{p}: ok (search {p.stem})" for p in SEARCHES),
        "quickstart: ok (search quickstart)",
        "debug: ok (debug)",
    ]


def test_a_search_spec_is_told_by_its_keys_or_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anywhere = tmp_path / "mine.yaml"
    anywhere.write_text(SEARCH_TEXT)
    (tmp_path / "searches").mkdir()
    in_searches = tmp_path / "searches" / "empty.yaml"
    in_searches.write_text("name: e\nbase: debug\n")  # no search key: known by its folder
    assert main(["validate", "--json", str(anywhere), str(in_searches)]) == 2
    res = json.loads(capsys.readouterr().out)
    assert res[str(anywhere)] == {"ok": True, "kind": "search", "name": "s", "problems": []}
    assert res[str(in_searches)]["kind"] == "search"
    assert [p.split(": ")[1] for p in res[str(in_searches)]["problems"]] == ["space", "budget", "n_trials"]


def test_search_only_keys_are_the_search_fields_a_model_spec_lacks() -> None:
    from moeforge.compiler import ModelSpec
    from moeforge.search import SearchSpec

    from moeforge.commands.validate import SEARCH_KEYS

    assert set(SEARCH_KEYS) == set(SearchSpec.model_fields) - set(ModelSpec.model_fields) - {"base"}


@pytest.mark.parametrize("command", ["validate", "search"])
def test_search_spec_problems_are_the_same_located_lines_from_every_command(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        SEARCH_TEXT.replace("base: debug", "base: debug\n  d_model: -64").replace(
            "n_trials: 2", "n_trials: 0"
        )
    )
    argv = [command, str(path)] + (["--out", str(tmp_path / "run")] if command == "search" else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == [
        f"{path}:4:3: base.d_model: must be greater than 0 (got -64)",
        f"{path}:8:1: n_trials: must be greater than 0 (got 0)",
    ]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- other subcommands
@pytest.mark.parametrize(
    "name", ["top_k_over_experts", "tab_indent", "python_object_tag", "base_broken_value"]
)
def test_report_exits_2_with_located_errors(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD / f"{name}.yaml"
    assert main(["report", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == len(expectations(path))
    for prefix, text in expectations(path):
        assert any(ln.startswith(prefix) and text in ln for ln in lines), err


def test_report_with_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "debug", "--set", "moe.topk=4"]) == 2
    _, err = capsys.readouterr()
    assert err == "<--set moe.topk=4>:1:1: moe.topk: unknown key; did you mean 'top_k'?\n"


def test_compare_exits_2_with_located_errors(capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD / "kv_heads_not_dividing.yaml"
    assert main(["compare", "debug", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    [(prefix, text)] = expectations(path)
    assert err.startswith(prefix) and text in err
    assert len(err.splitlines()) == 1


def test_compare_with_a_missing_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "debug", "debugg"]) == 2
    _, err = capsys.readouterr()
    assert err == "debugg:1:1: no such file or shipped spec; did you mean 'debug'?\n"


# ------------------------------------------------------------------- every flag of every command (issue 17)
# Each flag that takes a number, a seed, a device, a storage or an output folder, with the arguments that
# make the rest of the command valid. Every bad value must be refused while the arguments are parsed: one
# line `moeforge CMD: --flag: ...`, exit 2, before anything runs.
FLOAT, COUNT, SEED, DEVICE = "float", "count", "seed", "device"
FRACTION, UNIT = "fraction", "unit"  # in (0, 1) / in [0, 1]
BAD_VALUES = {
    FLOAT: ["nan", "inf", "-inf", "-5", "0", "x", "1e999"],
    FRACTION: ["nan", "inf", "-0.5", "0", "1", "1.5", "x"],
    UNIT: ["nan", "inf", "-0.5", "1.5", "x"],
    COUNT: ["nan", "inf", "-1", "x", "1e30", "99999999999999999999999", "2.5"],
    SEED: ["-1", "-3", str(2**32), "99999999999999999999999", "nan", "x"],
    DEVICE: ["tpu", "cuda:x", "gpu", "mps", ""],
}
FLAGS = [
    (["train", "debug"], "--budget-flops", FLOAT),
    (["train", "debug"], "--lr", FLOAT),
    (["train", "debug", "--steps", "1"], "--time", FLOAT),
    (["train", "debug"], "--tokens", COUNT),
    (["train", "debug"], "--steps", COUNT),
    (["train", "debug", "--steps", "1"], "--batch-size", COUNT),
    (["train", "debug", "--steps", "1"], "--micro-batch-size", COUNT),
    (["train", "debug", "--steps", "1"], "--eval-tokens", COUNT),
    (["train", "debug", "--steps", "1"], "--threads", COUNT),
    (["train", "debug", "--steps", "1"], "--seed", SEED),
    (["train", "debug", "--steps", "1"], "--device", DEVICE),
    (["train", "debug", "--steps", "1"], "--cooldown", UNIT),
    (["train", "debug", "--steps", "1"], "--warmup-tokens", COUNT),
    (["train", "debug", "--steps", "1"], "--beta2", FRACTION),
    (["train", "debug", "--steps", "1"], "--nproc", COUNT),
    (["eval", "debug", "--checkpoint", "x"], "--batch-size", COUNT),
    (["eval", "debug", "--checkpoint", "x"], "--eval-tokens", COUNT),
    (["eval", "debug", "--checkpoint", "x"], "--device", DEVICE),
    (["report", "debug", "--data", "bundled"], "--budget-flops", FLOAT),
    (["search", "quickstart"], "--budget-flops", FLOAT),
    (["search", "quickstart"], "--trials", COUNT),
    (["search", "quickstart"], "--device", DEVICE),
    (["scaling", "fit", "runs.csv"], "--resamples", COUNT),
    (["scaling", "fit", "runs.csv"], "--seed", SEED),
    (["scaling", "fit", "runs.csv"], "--target", FLOAT),
    (["scaling", "predict", "runs.csv", "--budget", "1e20"], "--resamples", COUNT),
    (["scaling", "predict", "runs.csv", "--budget", "1e20"], "--seed", SEED),
    (["scaling", "predict", "runs.csv", "--budget", "1e20"], "--granularities", FLOAT),
    (["scaling", "predict", "runs.csv"], "--budget", FLOAT),
    (["scaling", "check", "fit.json", "--out", "c"], "--budget", FLOAT),
    (["scaling", "check", "fit.json", "--out", "c", "--budget", "1e20"], "--granularities", FLOAT),
    (["scaling", "check", "fit.json", "--out", "c", "--budget", "1e20"], "--device", DEVICE),
    (["scaling", "check", "fit.json", "--out", "c", "--budget", "1e20"], "--resamples", COUNT),
    (["scaling", "check", "fit.json", "--out", "c", "--budget", "1e20"], "--seed", SEED),
    (["data", "prepare", "bundled", "--out", "d"], "--train-tokenizer", COUNT),
    (["data", "prepare", "bundled", "--out", "d"], "--seed", SEED),
    (["data", "prepare", "bundled", "--out", "d"], "--workers", COUNT),
    (["data", "prepare", "bundled", "--out", "d"], "--shard-tokens", COUNT),
    (["data", "prepare", "bundled", "--out", "d"], "--val-fraction", FLOAT),
    (["export", "hf", "debug", "--out", "e"], "--trial", COUNT),
]
CASES = [
    pytest.param([*argv, f"{flag}={value}"], flag, id=f"{argv[0]}{flag}={value}")
    for argv, flag, kind in FLAGS
    for value in BAD_VALUES[kind]
]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `moeforge ARGV` in this process; it must exit 2 with one line on stderr and no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, f"exit {code}: {out}{err}"
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "flag"), CASES)
def test_every_bad_flag_value_is_one_line_naming_the_flag(
    argv: list[str],
    flag: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written, and surely not into the checkout
    line = _refused(argv, capsys)
    command = " ".join(argv[:2] if argv[0] in ("scaling", "data") else argv[:1])
    assert line.startswith(f"moeforge {command}: {flag}: "), line
    assert "must be" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "100000", "5000"])
def test_threads_are_at_least_one_and_at_most_the_cores(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused(["train", "debug", "--steps", "1", "--threads", value], capsys)
    assert line.startswith("moeforge train: --threads: must be an integer in [1, ")


def test_a_storage_of_an_unknown_scheme_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["search", "quickstart"], ["search", "report"]):
        line = _refused([*argv, "--storage", "bogus://x"], capsys)
        assert line.startswith("moeforge search: --storage: must be sqlite:///FILE, postgresql://"), line
    assert list(tmp_path.iterdir()) == []  # no ./bogus:/x journal


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "debug", "--steps", "1", "--out", "{file}"],
        ["search", "quickstart", "--out", "{file}"],
        ["scaling", "fit", "runs.csv", "--out", "{file}"],
        ["import", "hf", "config.json", "--out", "{file}"],
        ["data", "prepare", "bundled", "--out", "{file}"],
        ["data", "prepare", "bundled", "--out", "{file}/sub"],
    ],
    ids=["train", "search", "scaling-fit", "import-hf", "data-prepare", "data-prepare-under-a-file"],
)
def test_out_naming_an_existing_file_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "a-file"
    file.write_text("keep me\n")
    line = _refused([a.replace("{file}", str(file)) for a in argv], capsys)
    assert ": --out: " in line and str(file) in line, line
    assert file.read_text() == "keep me\n"


def test_usage_errors_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["train", "debug", "--no-such-flag"], capsys)
    assert line.startswith("moeforge: unrecognized arguments: --no-such-flag") or "--no-such-flag" in line
    assert _refused(["data", "prepare"], capsys).startswith("moeforge data prepare: the following arguments")


def test_help_is_still_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: moeforge" in capsys.readouterr().out


# ------------------------------------------------------------------- files that are broken (issue 17 item 9)
SEARCH_EMPTY_BUDGET = (
    "name: s\nbase: debug\nspace: {granularity: [1, 2]}\nbudget: {train_flops: []}\nn_trials: 2\n"
)


@pytest.mark.parametrize("command", ["validate", "search"])
def test_an_empty_budget_list_is_a_located_spec_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_EMPTY_BUDGET)
    argv = [command, str(path)] + (["--out", str(tmp_path / "run")] if command == "search" else [])
    line = _refused(argv, capsys)
    assert line.startswith(f"{path}:4:10: budget.train_flops: an empty list"), line


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY random bytes" * 7], ids=["empty", "random"])
def test_export_with_a_broken_safetensors_checkpoint(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(content)
    line = _refused(
        ["export", "hf", "debug", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")], capsys
    )
    assert line.startswith(f"moeforge export: {ckpt}: not a readable safetensors file"), line


def _hf_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "hf"
    assert main(["export", "hf", "debug", "--out", str(folder)]) == 0
    capsys.readouterr()
    return folder


def test_import_with_a_broken_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _hf_folder(tmp_path, capsys)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    line = _refused(["import", "hf", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert line.startswith(f"moeforge import: {folder / 'model.safetensors'}: not a readable safetensors"), (
        line
    )


@pytest.mark.parametrize(
    "content", [b"[1, 2]", b'"a string"', b"\x89PNG\r\n\x1a\n\x00\xff"], ids=["list", "string", "binary"]
)
def test_import_of_a_config_that_is_not_an_object(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_bytes(content)
    line = _refused(["import", "hf", str(config), "--out", str(tmp_path / "o")], capsys)
    assert line.startswith(f"moeforge import: {config}: "), line


def test_data_prepare_with_a_binary_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = tmp_path / "tok.json"
    tok.write_bytes(bytes(range(128, 256)) * 3)
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 10)
    line = _refused(
        ["data", "prepare", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "d")], capsys
    )
    assert line.startswith(f"moeforge data prepare: {tok}: not a tokenizers tokenizer.json"), line


@pytest.mark.parametrize("content", ["[]", "{}", '{"storage": 3, "study": "s"}', "\x00garbage"])
def test_search_report_of_a_broken_run_json(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.json").write_text(content)
    line = _refused(["search", "report", str(tmp_path)], capsys)
    assert line.startswith(f"moeforge search: {tmp_path / 'run.json'}: not "), line


def _run_dir(tmp_path: Path, top_k: int = 2) -> Path:
    """A run dir as `moeforge train` leaves it: spec.yaml, train_config.json and an (untrained) checkpoint."""
    from moeforge.compiler import build, load_spec, spec_to_yaml
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    spec = load_spec("debug", [f"moe.top_k={top_k}"])
    (run / "spec.yaml").write_text(spec_to_yaml(spec))
    (run / "train_config.json").write_text('{"config": {}, "data": null}\n')
    state = {k: v.contiguous() for k, v in build(spec).state_dict().items()}
    save_file(state, str(run / "checkpoint" / "model.safetensors"))
    (run / "checkpoint" / "state.json").write_text('{"format": 1, "step": 0}\n')
    return run


def test_search_out_into_a_train_run_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    line = _refused(["search", "quickstart", "--out", str(run), "--trials", "1"], capsys)
    assert line == f"moeforge search: --out: {run} holds a `moeforge train` run; give another folder"
    assert not (run / "run.json").exists()


@pytest.mark.parametrize("where", ["run", "run/checkpoint", "run/checkpoint/model.safetensors"])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_checkpoint_of_another_top_k_is_refused(
    command: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path, top_k=2)  # the shapes of every top_k are the same
    argv = [command, *(["hf"] if command == "export" else []), "debug", "--set", "moe.top_k=4"]
    argv += ["--checkpoint", str(tmp_path / where)] + (
        ["--out", str(tmp_path / "e")] if command == "export" else []
    )
    line = _refused(argv, capsys)
    assert line.startswith(
        f"moeforge {command}: --checkpoint: {run} was trained with another spec (moe.top_k 2 there, 4 here)"
    ), line
    assert line.endswith(f"use the spec it records: {run / 'spec.yaml'}")


def test_eval_tokens_below_one_sequence_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    line = _refused(["eval", str(run), "--checkpoint", str(run), "--eval-tokens", "5"], capsys)
    assert line == "moeforge eval: --eval-tokens: 5 is less than one sequence of debug (128 tokens)"


def test_scaling_predict_at_a_budget_too_small_for_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    rows = ["params,tokens,loss,flops,seed"]
    for c in (1e17, 1e18, 1e19):
        for n in np.geomspace(1e7, 1e9, 6):
            loss = 1.69 + 406.4 / n**0.34 + 410.7 / (c / (6 * n)) ** 0.28
            rows.append(f"{n:.0f},{c / (6 * n):.0f},{loss * (1 + 0.005 * rng.standard_normal()):.5f},{c},0")
    csv = tmp_path / "runs.csv"
    csv.write_text("\n".join(rows) + "\n")
    line = _refused(["scaling", "predict", str(csv), "--budget", "1", "--resamples", "0"], capsys)
    assert line.startswith("moeforge scaling: --budget 1: too small for any model"), line


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "debug", "--seed", "99999999999999999999999"],
        ["train", "debug", "--tokens", "inf"],
        ["train", "debug", "--lr", "inf", "--steps", "1"],
        ["train", "debug", "--device", "tpu", "--steps", "1"],
        ["train", "debug", "--threads", "100000", "--steps", "1"],
        ["train", "debug", "--threads", "0", "--steps", "1"],
        ["scaling", "fit", "runs.csv", "--seed=-1"],
        ["scaling", "predict", "runs.csv", "--budget", "1e20", "--seed=-3"],
        ["scaling", "fit", "runs.csv", "--resamples", "100000000000"],
        ["scaling", "predict", "runs.csv", "--budget", "1e20", "--granularities", "nan"],
        ["report", "debug", "--data", "bundled", "--budget-flops", "nan"],
        ["report", "debug", "--data", "bundled", "--budget-flops=-5"],
        ["eval", "debug", "--checkpoint", "x", "--batch-size=-1"],
        ["eval", "debug", "--checkpoint", "x", "--eval-tokens", "0"],
        ["data", "prepare", "bundled", "--out", "d", "--train-tokenizer", "1000000000"],
    ],
    ids=lambda a: " ".join(a),
)
def test_the_inputs_issue_17_found(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert " must be " in _refused(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, option string, action) of every optional argument of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings and action.nargs != 0:
            yield path, action.option_strings[-1], action


def test_every_value_flag_is_checked_and_in_the_table() -> None:
    """A flag that takes a number or a device is parsed by a checked type (moeforge/commands/_types.py) and
    is listed in FLAGS, so the table above grows with the CLI instead of going stale."""
    from moeforge.cli import build_parser

    unchecked, untabled = [], []
    for path, flag, action in _options(build_parser()):
        kind = action.type
        if kind in (int, float):
            unchecked.append(f"{' '.join(path)} {flag}")
        elif (
            getattr(kind, "__module__", "") == "moeforge.commands._types"
            and kind.__name__ not in ("out_dir", "storage")  # tried by the file and URL tests above
            and flag != "--worker"  # internal: how a search starts its worker processes
            and not any(argv[: len(path)] == list(path) and f == flag for argv, f, _ in FLAGS)
        ):
            untabled.append(f"{' '.join(path)} {flag}")
    assert not unchecked, "parse these with a checked type from moeforge/commands/_types.py: " + ", ".join(
        unchecked
    )
    assert not untabled, "add these to FLAGS: " + ", ".join(untabled)
