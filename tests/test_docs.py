"""What README.md and docs/*.md show holds: every command in them runs in a test or is marked illustrative.

Convention: a fenced block whose previous non-blank line is `<!-- illustrative -->` shows commands no test
runs as written (they train for minutes, need a GPU, a network or a model folder). Every other command, a
line of a ```bash / ```sh / ```console block or a `$ ` line of any block, must be in RUN_BY, which names
the test that runs it (or `.ci/run`, which CI runs).
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from moeforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- illustrative -->"
SHELL = {"bash", "sh", "shell", "console"}

TEST_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev,docs]"'
    " && python -m pytest && mkdocs build --strict && bash .ci/floors && bash .ci/wheel"
)
# command as shown -> where it runs ("tests/FILE.py::FUNCTION" or ".ci/run")
RUN_BY = {
    TEST_COMMAND: ".ci/run",
    "moeforge report deepseekmoe-16b": "tests/test_docs.py::test_the_report_shown_is_what_report_prints",
    "moeforge train debug --budget-flops 1e6": (
        "tests/cli/test_train_cli.py::test_train_refuses_a_budget_too_small_to_train"
    ),
    "moeforge compare gshard-2b ladder-shared-2b ladder-m2-2b ladder-m4-2b": (
        "tests/test_docs.py::test_the_compare_shown_runs"
    ),
}


def blocks(path: Path) -> list[tuple[int, str, bool, list[str]]]:
    """(line, language, marked illustrative, lines) of every fenced block in a page."""
    found = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        before = [line for line in lines[:i] if line.strip()]
        marked = bool(before) and before[-1].strip() == MARK
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append((i + 1, m.group(1), marked, lines[i + 1 : end]))
        i = end + 1
    return found


def commands(language: str, body: list[str]) -> list[str]:
    """The commands a block shows: its `$ ` lines, or every line of a shell block, continuations joined and
    trailing comments dropped."""
    if any(line.startswith("$ ") for line in body):
        return [line[2:].strip() for line in body if line.startswith("$ ")]
    if language not in SHELL:
        return []
    out: list[str] = []
    pending = ""
    for line in body:
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(" ".join(line.split()))
    return out


def shown() -> list[tuple[str, int, str]]:
    """(page, line, command) of every command that is not marked illustrative."""
    return [
        (path.relative_to(ROOT).as_posix(), line, command)
        for path in PAGES
        for line, language, marked, body in blocks(path)
        if not marked
        for command in commands(language, body)
    ]


def test_every_command_shown_runs_in_a_test_or_is_marked_illustrative() -> None:
    unrun = [f"{page}:{line}: {command}" for page, line, command in shown() if command not in RUN_BY]
    assert not unrun, (
        f"run these in a test (and list them in RUN_BY) or mark the block {MARK}:\n" + "\n".join(unrun)
    )


def test_every_listed_command_is_shown_and_its_test_exists() -> None:
    commands_shown = {command for _, _, command in shown()}
    for command, where in RUN_BY.items():
        assert command in commands_shown, f"RUN_BY lists a command no page shows: {command}"
        if where == ".ci/run":
            assert command in (ROOT / ".ci" / "run").read_text().splitlines(), (
                f".ci/run does not run {command}"
            )
            continue
        file, _, function = where.partition("::")
        tree = ast.parse((ROOT / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert function in names, f"{where} does not exist"


def test_the_marker_is_found() -> None:
    """The convention can fail: a marked block is seen as marked, an unmarked one as not."""
    page = ROOT / "docs" / "training.md"
    found = blocks(page)
    assert any(marked for _, _, marked, _ in found)
    assert commands("bash", ["moeforge train a \\", "  --out b   # note", "# only a comment"]) == [
        "moeforge train a --out b"
    ]


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_report_shown_is_what_report_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "deepseekmoe-16b"]) == 0
    printed = {line.rstrip() for line in capsys.readouterr().out.splitlines()}
    for path in (ROOT / "README.md", ROOT / "docs" / "reports.md"):
        for _, _, _, body in blocks(path):
            if body and body[0] == "$ moeforge report deepseekmoe-16b":
                for line in body[1:]:
                    if line != "...":
                        assert line.rstrip() in printed, f"{path.name}: not printed: {line!r}"
                break
        else:
            pytest.fail(f"{path.name} no longer shows `moeforge report deepseekmoe-16b`")


def test_the_compare_shown_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one column per spec, names unwrapped
    command = "moeforge compare gshard-2b ladder-shared-2b ladder-m2-2b ladder-m4-2b"
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    for name in shlex.split(command)[2:]:
        assert name in out


def test_every_page_is_in_the_nav_and_every_readme_link_exists() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"mkdocs.yml's nav lacks docs/{page.name}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_the_api_page_documents_each_public_package() -> None:
    directives = re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert directives == ["moeforge.compiler", "moeforge.runtime", "moeforge.search"]
