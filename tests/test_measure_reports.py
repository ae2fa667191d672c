"""Golden files of the measure report, as tests/test_check_reports.py keeps the check's:

- ``measure.md`` and ``measure.txt`` (the terminal table), rendered from the fixed report of
  tests/test_schemas.py (whose JSON is ``measure.json``), which has every kind of layer entry;
- ``measure-real.json`` (and its ``.md`` and ``.txt``): a real ``measure`` of a seeded
  three-layer MLP, with what differs between two identical runs normalised (tool version,
  paths, clock times, host) and every number rounded to six significant digits (the last bits
  of a float may differ between CPUs; a change of the maths moves far more). Any other field
  that changes fails the test.

Regenerate with ``DYNAUDIT_REGEN_GOLDEN=1`` after a deliberate change, and review the diff.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import dynaudit
from dynaudit.reports import render_markdown, render_terminal
from dynaudit.schema import Report
from tests.producers import save_module
from tests.test_schemas import sample_measure_report

GOLDEN = Path(__file__).parent / "golden"
SIGNIFICANT = 6
# Envelope fields whose values are the run's, not the measurement's: replaced, never dropped.
ENVELOPE = {"created_at": "2026-01-01T00:00:00+00:00", "host": "golden", "seconds": 1.5}


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DYNAUDIT_REGEN_GOLDEN") == "1":
        path.write_bytes(text.encode("utf-8"))
    expected = path.read_bytes().decode("utf-8")  # bytes: no newline translation
    assert text == expected, f"{name} changed; review, then DYNAUDIT_REGEN_GOLDEN=1"


def terminal_text(report: Report) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=140, color_system=None, force_terminal=False)
    render_terminal(report, console)
    return buffer.getvalue()


def sample() -> Report:
    """tests/test_schemas.py's report, with the fit settings the Markdown header names."""
    report = sample_measure_report()
    settings = {**report.settings, "mu": 0.03, "seed": 0, "seeds": 3}
    return report.model_copy(update={"settings": settings})


def test_the_markdown_golden() -> None:
    assert_golden("measure.md", render_markdown(sample()))


def test_the_terminal_golden() -> None:
    assert_golden("measure.txt", terminal_text(sample()))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def normalised(report: Report) -> dict[str, Any]:
    """The report's JSON with the run's own values replaced and the numbers rounded."""
    data: dict[str, Any] = json.loads(report.model_dump_json())
    data.update(ENVELOPE)
    data["tool"]["version"] = "0.0.0-golden"
    data["source"].update(uri="<checkpoint>", path="<checkpoint>")
    for layer in data["layers"]:
        if "seconds" in layer:
            layer["seconds"] = 0.5
    rounded: dict[str, Any] = _rounded(data)
    return rounded


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    torch.manual_seed(0)
    widths = [16, 24, 32, 8]
    layers: list[torch.nn.Module] = []
    for inputs, outputs in itertools.pairwise(widths):
        layers += [torch.nn.Linear(inputs, outputs), torch.nn.ReLU()]
    module = torch.nn.Sequential(*layers[:-1])
    folder = tmp_path_factory.mktemp("golden") / "mlp"
    checkpoint = save_module(module, folder, {"model_type": "mlp"})
    fit = {"q_dim": 8, "pieces": 2, "steps": 20, "seeds": 2, "threads": 1}
    return dynaudit.measure(checkpoint, cache=False, **fit)


def test_the_real_measure_golden(real_report: Report) -> None:
    data = normalised(real_report)
    assert_golden("measure-real.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    report = Report.model_validate(data)
    assert_golden("measure-real.md", render_markdown(report))
    assert_golden("measure-real.txt", terminal_text(report))


def _paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {p for key, item in value.items() for p in _paths(item, f"{prefix}/{key}")} | {
            prefix
        }
    if isinstance(value, list):
        return {p for i, item in enumerate(value) for p in _paths(item, f"{prefix}/{i}")} | {prefix}
    return {prefix}


def test_the_normalisation_hides_no_field(real_report: Report) -> None:
    """Every field of the report is in the golden, and a measured number that moves by more
    than the rounding changes it."""
    raw = json.loads(real_report.model_dump_json())
    assert _paths(normalised(real_report)) == _paths(raw)
    layer = real_report.measured[0]
    assert layer.discrepancy is not None
    moved = layer.model_copy(update={"discrepancy": layer.discrepancy * 1.0001})
    other = real_report.model_copy(update={"layers": [moved, *real_report.layers[1:]]})
    assert normalised(other) != normalised(real_report)
