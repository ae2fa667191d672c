"""The command line as a user meets it: exit codes, one-line errors (run in-process by
:func:`tests.cli.run_cli`, which gives each call what a fresh process would see)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynaudit.config import PROTOCOL_VERSION
from tests.cli import CliResult, run_cli
from tests.conftest import WriteCheckpoint

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "40"]


def assert_one_line_error(proc: CliResult, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_measure_twice_gives_identical_numbers(digits_mlp: Path, tmp_path: Path) -> None:
    from dynaudit.schema import Report

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        proc = run_cli(
            "measure", str(digits_mlp), *FAST, "--json", str(out), "--quiet", "--no-cache"
        )
        assert proc.returncode == 0, proc.stderr
    a = Report.model_validate_json(first.read_text())
    b = Report.model_validate_json(second.read_text())
    assert a.numbers() == b.numbers()
    data = json.loads(first.read_text())
    assert data["schema_version"] == 1 and data["protocol_version"] == PROTOCOL_VERSION == 3
    assert len(a.measured) == 3
    for layer in a.measured:
        for field in ("discrepancy", "mean_distance", "fidelity", "scale"):
            assert isinstance(getattr(layer, field), float)
    assert a.summary.all.layers == 3
    assert set(a.summary.groups) == {"bottom", "middle", "top"}
    assert a.source.files and all(len(h) == 64 for h in a.source.files.values())


def test_measure_writes_markdown_and_prints_a_table(digits_mlp: Path, tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    proc = run_cli("measure", str(digits_mlp), *FAST, "--markdown", str(md))
    assert proc.returncode == 0, proc.stderr
    assert "mean dist" in proc.stdout and "summary" in proc.stdout
    text = md.read_text()
    assert "| all | 3 |" in text and "## Layers" in text


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_one_line_error(run_cli("measure", str(missing)), 3, str(missing), "no such file")


def test_compare_with_nothing_to_audit(tmp_path: Path) -> None:
    """Only biases and scalars (``measure`` of one: tests/cases.py): ``compare`` says so too."""
    path = tmp_path / "model.safetensors"
    save_file({"fc.bias": torch.randn(8), "scale": torch.tensor(2.0)}, str(path))
    assert_one_line_error(run_cli("compare", str(path), str(path)), 3, "no weight matrix to audit")


def test_file_that_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("<html>not a model</html>")
    assert_one_line_error(run_cli("measure", str(path)), 3, str(path), "not a safetensors file")


def test_pickle_is_refused_and_never_loaded(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {canary}",))

    import pickle

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    proc = run_cli("measure", str(tmp_path))
    assert_one_line_error(proc, 3, "pytorch_model.bin", "pickle")
    assert not canary.exists()


def test_non_finite_weights_exit_1_naming_the_tensors(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    bad = torch.randn(16, 16)
    bad[3, 4] = float("nan")
    inf = torch.randn(16, 16)
    inf[0, 0] = float("inf")
    path = write_checkpoint({"a.weight": bad, "b.weight": torch.randn(16, 16), "c.weight": inf})
    out = tmp_path / "r.json"
    proc = run_cli("measure", str(path), *FAST, "--json", str(out), "--quiet")
    assert_one_line_error(proc, 1, "a.weight", "c.weight", "non-finite")
    report = json.loads(out.read_text())
    assert report["non_finite"] == ["a.weight", "c.weight"]
    assert [x["discrepancy"] is None for x in report["layers"]] == [True, False, True]


def test_a_crafted_tensor_name_stays_on_one_line(write_checkpoint: WriteCheckpoint) -> None:
    """Regression: a NaN in a tensor named "x\\n::error::pwned" printed the name raw, in the
    error (three lines on stderr) and in the table's non-finite line, each starting a GitHub
    workflow command of its own."""
    crafted = "blocks.1.evil\n::error::pwned\r,:end.weight"
    bad = torch.randn(16, 16)
    bad[3, 4] = float("nan")
    path = write_checkpoint({"a.weight": torch.randn(16, 16), crafted: bad})
    proc = run_cli("measure", str(path), *FAST)
    assert_one_line_error(proc, 1, "non-finite", "blocks.1.evil\\n::error::pwned\\r")
    for line in (proc.stdout + proc.stderr).splitlines():
        assert not line.lstrip().startswith("::"), line


def test_all_zero_matrix_gets_null_metrics(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    path = write_checkpoint({"a.weight": torch.zeros(12, 10), "b.weight": torch.randn(12, 10)})
    out = tmp_path / "r.json"
    proc = run_cli("measure", str(path), *FAST, "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    layers = {x["name"]: x for x in json.loads(out.read_text())["layers"]}
    zero = layers["a.weight"]
    assert zero["reason"] == "all-zero matrix"
    assert zero["discrepancy"] is None and zero["fidelity"] is None
    assert layers["b.weight"]["discrepancy"] > 0
    assert json.loads(out.read_text())["summary"]["all"]["layers"] == 1


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--pieces", "3", "--q-dim", "12"], "even"), (["--q-dim", "10", "--pieces", "4"], "divide"),
     (["--family", "generc"], "did you mean 'generic'"),
     # Parsed by Typer's own copy of click (Typer ≥ 0.22): these were exit 4, "internal error".
     (["--bogus"], "No such option: --bogus"), (["--steps", "abc"], "'--steps'"),
     (["--device", "tpu"], "device")],
)  # fmt: skip
def test_usage_errors_exit_2(digits_mlp: Path, flags: list[str], needle: str) -> None:
    assert_one_line_error(run_cli("measure", str(digits_mlp), *flags), 2, needle)


def test_parse_errors_name_the_command_and_its_help() -> None:
    assert_one_line_error(run_cli("check"), 2, "Missing argument", "`dynaudit check --help`")
    assert_one_line_error(run_cli("nosuch"), 2, "No such command 'nosuch'")
    bare = run_cli()
    assert bare.returncode == 2 and "Commands" in bare.stdout and "Traceback" not in bare.stderr


def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("measure", str(tmp_path / "nope"), env={"DYNAUDIT_DEBUG": "1"})
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr


def test_inspect_and_plugins(digits_mlp: Path) -> None:
    proc = run_cli("inspect", str(digits_mlp), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["family"]["name"] == "generic"
    assert [x["shape"] for x in found["layers"]] == [[384, 64], [384, 384], [10, 384]]
    assert found["gflop"] > 0
    table = run_cli("inspect", str(digits_mlp))
    assert table.returncode == 0 and "fit GFLOP" in table.stdout
    plugins = run_cli("plugins")
    assert plugins.returncode == 0 and "generic" in plugins.stdout


def test_help_documents_exit_codes() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for code in ("0", "1", "2", "3", "4", "130"):
        assert f"exit {code}:" in proc.stdout


def test_python_api_matches_cli_settings(digits_mlp: Path) -> None:
    import dynaudit

    report = dynaudit.measure(digits_mlp, q_dim=16, pieces=4, steps=40, seeds=2)
    assert isinstance(report, dynaudit.Report)
    assert all(layer.spread is not None for layer in report.measured)
    with pytest.raises(dynaudit.DynauditError):
        dynaudit.measure(digits_mlp, pieces=3)
