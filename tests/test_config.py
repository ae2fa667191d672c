"""CLI conventions (SPEC §8): --version, completion, -v, and settings from flag > DYNAUDIT_*
variable > [tool.dynaudit] or --config > default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynaudit import __version__
from dynaudit.cli import main

SMALL = ["--q-dim", "16", "--pieces", "4"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({"0.weight": torch.randn(24, 12), "2.weight": torch.randn(6, 24)}, path)
    return path


@pytest.fixture
def stored(model: Path, tmp_path: Path) -> Path:
    """A small stored baseline of ``model``: checks against it refit in a blink."""
    out = tmp_path / "baseline"
    args = ["baseline", str(model), "--out", str(out), *SMALL, "--steps", "12", "--seeds", "1"]
    assert main(args) == 0
    return out


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder as the working directory, with no DYNAUDIT_* variable set."""
    for name in list(os.environ):
        if name.startswith("DYNAUDIT_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def settings_of(
    capsys: pytest.CaptureFixture[str], model: Path, *args: str, before: tuple[str, ...] = ()
) -> dict[str, object]:
    code = main([*before, "measure", str(model), *SMALL, "--json", "-", "--no-cache", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    settings: dict[str, object] = json.loads(out)["settings"]
    return settings


def one_line(capsys: pytest.CaptureFixture[str], code: int, expected: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dynaudit {__version__}"


def test_completion_script_and_answers() -> None:
    env = {**os.environ, "_DYNAUDIT_COMPLETE": "complete_bash", "COMP_WORDS": "dynaudit me",
           "COMP_CWORD": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from dynaudit.cli.app import app; "
         "sys.exit(app(prog_name='dynaudit'))"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.stdout.split() == ["measure"], proc.stderr
    script = subprocess.run(
        [sys.executable, "-m", "dynaudit", "--show-completion", "bash"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert script.returncode == 0 and "_DYNAUDIT_COMPLETE" in script.stdout


def test_completion_installs(tmp_path: Path) -> None:
    """``--install-completion`` writes the script and sources it from the shell's rc file."""
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "--install-completion", "bash"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / ".bash_completions" / "dynaudit.sh"
    assert "_DYNAUDIT_COMPLETE" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def test_flag_beats_variable_beats_file_beats_default(
    project: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settings_of(capsys, model)["steps"] == 600  # the default
    (project / "pyproject.toml").write_text("[tool.dynaudit]\nsteps = 12\nmax_entries = 0\n")
    found = settings_of(capsys, model)
    assert found["steps"] == 12 and found["max_entries"] == 0  # dashes or underscores
    monkeypatch.setenv("DYNAUDIT_STEPS", "11")
    assert settings_of(capsys, model)["steps"] == 11
    assert settings_of(capsys, model, "--steps", "10")["steps"] == 10


def test_a_config_file_of_its_own_with_a_policy(
    project: Path, model: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config names any TOML file: the keys at its top level, the policy as [policy]; it
    replaces ./pyproject.toml's table, it does not merge with it."""
    (project / "pyproject.toml").write_text("[tool.dynaudit]\nsteps = 12\nseeds = 2\n")
    config = project / "audit.toml"
    config.write_text('steps = 9\ndevice = "cpu"\n[policy]\nmax_drop_all = 0.5\n')
    found = settings_of(capsys, model, before=("--config", str(config)))
    assert found["steps"] == 9 and found["seeds"] == 1
    code = main(["--config", str(config), "check", str(model), "--baseline", str(stored),
                 "--json", "-"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["policy"]["max_drop_all"] == 0.5


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[tool.dynaudit]\nstepz = 3\n", ("unknown setting 'stepz'", "pyproject.toml")),
        ('[tool.dynaudit]\nsteps = "many"\n', ("steps = 'many' must be an integer",)),
        ("[tool.dynaudit]\nsteps = true\n", ("must be an integer",)),
        ("[tool.dynaudit\n", ("cannot read the settings",)),
    ],
)
def test_a_bad_settings_file_is_one_line_exit_2(
    project: Path,
    model: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    needles: tuple[str, ...],
) -> None:
    (project / "pyproject.toml").write_text(text)
    one_line(capsys, main(["measure", str(model)]), 2, *needles)


def test_a_missing_config_file_is_one_line_exit_2(
    project: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one_line(capsys, main(["--config", "nope.toml", "measure", str(model)]), 2, "nope.toml")


def test_the_report_says_where_the_baseline_came_from(
    project: Path,
    model: Path,
    stored: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: a family taken from the baseline was reported "chosen with --family"."""
    (project / "pyproject.toml").write_text(
        f"[tool.dynaudit]\nbaseline = {json.dumps(str(stored))}\n"
    )

    def resolved_from(*args: str) -> tuple[str, str]:
        code = main(["check", str(model), "--json", "-", *args])
        out = capsys.readouterr().out
        assert code == 0
        report = json.loads(out)
        return report["baseline"]["resolved_from"], report["family"]["detected_by"]

    assert resolved_from() == (
        "baseline in [tool.dynaudit] of pyproject.toml", "the baseline's family"
    )  # fmt: skip
    monkeypatch.setenv("DYNAUDIT_BASELINE", str(stored))
    assert resolved_from()[0] == "DYNAUDIT_BASELINE"
    assert resolved_from("--baseline", str(stored), "--family", "generic") == (
        "--baseline", "chosen with --family"
    )  # fmt: skip


def test_verbose_says_what_it_reads(
    project: Path, model: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["check", str(model), "--baseline", str(stored), "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # quiet by default
    assert main(["-v", *args]) == 0
    err = capsys.readouterr().err
    assert f"dynaudit: info: baseline {stored} (--baseline)" in err
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # -v held for one run only


def test_very_verbose_shows_the_traceback_of_an_error(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-vv", "measure", "nope"]) == 3
    assert "Traceback" in capsys.readouterr().err
    assert main(["measure", "nope"]) == 3
    assert "Traceback" not in capsys.readouterr().err


def test_running_out_of_gpu_memory_is_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: CUDA's out-of-memory error is not a MemoryError and was "internal error"."""
    from dynaudit.cli._errors import report_error

    code = report_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert code == 3 and "out of memory" in capsys.readouterr().err


def test_the_usual_variables_beat_the_file_for_endpoints(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: ``hf-endpoint`` in the file won over HF_ENDPOINT (and ``mlflow-uri`` over
    MLFLOW_TRACKING_URI), against flag > variable > file."""
    (project / "pyproject.toml").write_text(
        '[tool.dynaudit]\nhf-endpoint = "http://127.0.0.1:9/file"\n'
    )
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/variable")
    one_line(capsys, main(["inspect", "hf://org/x"]), 3, "http://127.0.0.1:9/variable")
    monkeypatch.delenv("HF_ENDPOINT")
    one_line(capsys, main(["inspect", "hf://org/x"]), 3, "http://127.0.0.1:9/file")


def test_a_config_file_replaces_pyproject_for_the_policy_and_the_baseline(
    project: Path, model: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: with --config FILE, ./pyproject.toml's policy and baseline still applied.
    Paths in the file are relative to it."""
    (project / "pyproject.toml").write_text(
        f"[tool.dynaudit]\nbaseline = {json.dumps(str(stored))}\n"
        "[tool.dynaudit.policy]\nmax_drop_all = 1.5\n"
    )
    elsewhere = project / "ci"
    elsewhere.mkdir()
    config = elsewhere / "audit.toml"
    config.write_text('cache-dir = "cache"\n')
    code = main(["--config", str(config), "check", str(model)])
    one_line(capsys, code, 2, "no baseline given")
    stored.rename(elsewhere / "base")
    config.write_text('cache-dir = "cache"\nbaseline = "base"\n')
    code = main(["--config", str(config), "check", str(model), "--json", "-"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["policy"]["max_drop_all"] == 2.0  # the default, not pyproject's 1.5
    assert report["baseline"]["ref"] == str(elsewhere / "base")
    assert report["baseline"]["resolved_from"] == f"baseline in --config {config}"


def test_a_policy_that_is_not_a_table_is_refused(
    project: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: ``policy = "gate.toml"`` was silently ignored."""
    (project / "pyproject.toml").write_text('[tool.dynaudit]\npolicy = "gate.toml"\n')
    one_line(capsys, main(["check", str(model)]), 2, "policy must be a table", "--policy FILE")


def test_verbose_names_settings_a_command_does_not_use(
    project: Path, model: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check`` takes its fit settings from the baseline: the file's are named, not dropped
    in silence."""
    (project / "pyproject.toml").write_text('[tool.dynaudit]\nsteps = 12\ndevice = "cpu"\n')
    assert main(["-v", "check", str(model), "--baseline", str(stored), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "[tool.dynaudit] of pyproject.toml: steps not used by `dynaudit check`" in err


def test_a_tool_dynaudit_that_is_not_a_table_is_one_line_exit_2(
    project: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: ``[tool] dynaudit = 3`` in ./pyproject.toml was exit 4 (an AttributeError
    while looking for the baseline it declares)."""
    (project / "pyproject.toml").write_text("[tool]\ndynaudit = 3\n")
    one_line(capsys, main(["check", str(model)]), 2, "tool.dynaudit must be a table")
