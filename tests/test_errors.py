"""Errors and exit codes in one module (issue 21 item 5): every error class declares its exit
code and next step; the CLI renders exactly them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dynaudit.errors as errors
from dynaudit.cli._errors import report_error
from dynaudit.errors import DynauditError, ExitCode, StructureError
from dynaudit.reports.ci import render_pr_comment, verdict_of

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = [
    cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, DynauditError)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_declares_its_next_step_and_an_exit_code(cls: type) -> None:
    assert "hint" in vars(cls), f"{cls.__name__} inherits its hint: say its own next step"
    assert isinstance(cls.exit_code, ExitCode)


def test_no_error_class_outside_errors_py() -> None:
    package = Path(errors.__file__).parent
    roots = [package, package.parent / "plugins"]
    found = [
        f"{path}: {match.group(1)}"
        for root in roots
        for path in root.rglob("*.py")
        if path.name != "errors.py"
        for match in re.finditer(
            r"^class (\w+)\((?:\w*Error|\w*Refused|DynauditError)\b", path.read_text(), re.M
        )
        if not match.group(1).startswith("_") and match.group(1) != "ConformanceError"
    ]
    assert found == []


def test_the_readme_table_lists_every_exit_code() -> None:
    section = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert listed == set(ExitCode)


def test_the_cli_adds_the_class_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code = report_error(StructureError("llama: block 3 lacks mlp.up_proj", path="/m"))
    assert code == ExitCode.INPUT == 3
    assert capsys.readouterr().err == (
        "dynaudit: error: llama: block 3 lacks mlp.up_proj (`dynaudit inspect` lists its "
        "tensors; `--family` picks another family)\n"
    )


def test_the_root_error_carries_path_and_uri() -> None:
    error = errors.RemoteNotFound("hf://org/m: gone", uri="hf://org/m")
    assert (error.uri, error.path, error.exit_code) == ("hf://org/m", None, ExitCode.INPUT)
    assert errors.InputError("x", path="/p").path == "/p"  # the call sites of before


def test_exit_codes_print_as_numbers() -> None:
    assert f"{ExitCode.GATE_FAILED}" == str(ExitCode.GATE_FAILED) == "1"


def test_the_action_names_an_exit_code_that_is_not_dynaudits() -> None:
    assert [verdict_of(code) for code in (0, 1, 3, 137)] == ["pass", "fail", "error", "error"]
    assert "exited 3 (input error: " in render_pr_comment(None, 3, None)
    assert "exited 137 (unexpected exit code)" in render_pr_comment(None, 137, None)
