"""Golden files for the check report in JSON, Markdown and JUnit, and GitHub Actions output —
with a tensor name crafted to break each format."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dynaudit.gate import decide
from dynaudit.reports.check import render_check_markdown
from dynaudit.reports.ci import (
    escape_command_data,
    github_annotations,
    render_junit,
    report_to_github,
)
from dynaudit.schema import (
    BaselineInfo,
    Change,
    CheckReport,
    Comparison,
    FamilyInfo,
    GroupComparison,
    LayerComparison,
    Policy,
    SourceInfo,
)

GOLDEN = Path(__file__).parent / "golden"
CRAFTED = (
    "evil\n::error::pwned | `code` <b>&amp; [link](http://x) %0A\r,:end"
    "\x1b[2K\x1b[1Gverdict: PASS\x07\u202egnp.\u2066x\x00\x0c"
)
# A layer type from a crafted name: the JUnit "type …" test case was not escaped (issue 18).
CRAFTED_TYPE = "value\x1b[31m\x0b<&>\u202e"


def _layer(name: str, type_: str, group: str, mean: float) -> LayerComparison:
    return LayerComparison(
        name=name, type=type_, depth={"bottom": 0, "middle": 1, "top": 2}[group],
        group=group,  # type: ignore[arg-type]
        shape=[1, 8, 8], baseline_mean_distance=2.0, mean_distance=2.0 * (1 + mean),
        change=Change(mean=mean, std=0.001, absolute=2.0 * mean, seeds=3), displacement=0.05,
        null_drift=0.001, noise=0.001, fidelity=0.61, weight_change=abs(mean) / 4,
        noise_likeness=0.3,
    )  # fmt: skip


def _group(mean: float, layers: int) -> GroupComparison:
    return GroupComparison(
        layers=layers, change=Change(mean=mean, std=0.002, absolute=mean, seeds=3),
        noise=0.002, displacement=0.05,
    )  # fmt: skip


def sample_report() -> CheckReport:
    layers = [
        _layer("model.layers.0.q_proj.weight", "query", "bottom", -0.05),
        _layer(CRAFTED, CRAFTED_TYPE, "bottom", -0.40),
        _layer("model.layers.1.q_proj.weight", "query", "middle", 0.001),
        _layer("model.layers.2.q_proj.weight", "query", "top", -0.002),
    ]
    comparison = Comparison(
        layers=layers,
        all=_group(-0.11, 4),
        groups={"bottom": _group(-0.225, 2), "middle": _group(0.001, 1), "top": _group(-0.002, 1)},
        types={"query": _group(-0.017, 3), CRAFTED_TYPE: _group(-0.40, 1)},
    )
    policy = Policy()
    source = SourceInfo(uri="hf://org/fine-tuned@v2", path="/cache/x", revision="abc", files={})
    return CheckReport(
        tool={"name": "dynaudit", "version": "0.0.0-golden"},
        source=source,
        baseline=BaselineInfo(
            ref="baselines/base", resolved_from="--baseline", seeds=3, stored=True,
            created_at="2026-01-01T00:00:00+00:00",
            source=source.model_copy(update={"uri": "hf://org/base"}),
        ),
        family=FamilyInfo(name="llama", confidence=1.0, detected_by="config.json", depth_note=""),
        settings={"q_dim": 32, "pieces": 4, "steps": 150, "warm_steps": 100, "device": "cpu"},
        policy=policy,
        comparison=comparison,
        verdict=decide(comparison, policy),
        created_at="2026-01-01T00:00:00+00:00",
        host="golden",
        seconds=1.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "render"),
    [
        ("check.json", lambda r: r.model_dump_json(indent=2) + "\n"),
        ("check.md", render_check_markdown),
        ("check.xml", render_junit),
    ],
)
def test_golden(name: str, render: object) -> None:
    text = render(sample_report())  # type: ignore[operator]
    path = GOLDEN / name
    if os.environ.get("DYNAUDIT_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    expected = path.read_bytes().decode("utf-8")  # bytes: no newline translation of a CR
    assert text == expected, f"{name} changed; review, then DYNAUDIT_REGEN_GOLDEN=1"


def test_the_crafted_name_breaks_no_format() -> None:
    report = sample_report()
    markdown = render_check_markdown(report)
    assert "\n::error::pwned" not in markdown and "<b>" not in markdown
    assert all(line.count("|") - line.count("\\|") == 9 for line in markdown.splitlines()
               if line.startswith("| ") and "evil" in line)  # fmt: skip
    root = ET.fromstring(render_junit(report))
    names = [case.get("name") for case in root.iter("testcase")]
    assert names[:4] == ["all layers", "bottom third", "middle third", "top third"]
    failures = {
        case.get("name") for case in root.iter("testcase") if case.find("failure") is not None
    }
    assert failures == {"all layers", "bottom third", "type value\\x1b[31m\\x0b<&>\\u202e"}
    texts = [f.text or "" for f in root.iter("failure")]
    assert any("pwned" in t and "\\r" in t for t in texts)  # the CR shown, not written
    annotations = github_annotations(report)
    for line in annotations:
        # One command per line: the crafted "\n::error::" is data after %0A, not a command.
        assert line.startswith("::error title=dynaudit%3A ")
        assert "\n" not in line and "\r" not in line
        assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert sum("%0A::error::pwned" in line for line in annotations) == 1  # the damaged layer's
    assert escape_command_data("a%\r\nb") == "a%25%0D%0Ab"


def test_the_crafted_name_starts_no_line_in_the_terminal() -> None:
    """Regression: the verdict's reasons were printed raw, so the name's "\\n::error::pwned"
    became a line of its own in the CI log: a workflow command GitHub would run."""
    from io import StringIO

    from rich.console import Console

    from dynaudit.reports.check import render_check_terminal

    out = StringIO()
    render_check_terminal(sample_report(), Console(file=out, width=140))
    text = out.getvalue()
    assert "evil\\n::error::pwned" in text
    for line in text.splitlines():
        assert not line.lstrip().startswith("::"), line


def test_github_actions_outputs(tmp_path: Path) -> None:
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    summary.write_text("earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
           "GITHUB_OUTPUT": str(output)}  # fmt: skip
    lines = report_to_github(sample_report(), env)
    assert summary.read_text().startswith("earlier step\n# dynaudit check: hf://org/fine-tuned@v2")
    assert output.read_text() == "verdict=fail\n"
    assert lines == github_annotations(sample_report())
    assert report_to_github(sample_report(), {}) == []


def test_one_annotation_per_root_cause() -> None:
    """Regression: annotations were one per failing group, so one damaged layer (in all layers,
    its third and its type) gave three ``::error`` lines with the same message."""
    report = sample_report()
    layers = [_layer("model.layers.0.q_proj.weight", "query", "bottom", 0.001),
              _layer("model.layers.2.o_proj.weight", "output", "top", 0.30)]  # fmt: skip
    comparison = Comparison(
        layers=layers, all=_group(0.001, 2),
        groups={"bottom": _group(0.001, 1), "top": _group(0.001, 1)},
        types={"query": _group(0.001, 1), "output": _group(0.30, 1)},
    )  # fmt: skip
    report = report.model_copy(update={"comparison": comparison,
                                       "verdict": decide(comparison, Policy())})  # fmt: skip
    assert report.verdict.failing_groups == ["all", "top", "output"]
    assert github_annotations(report) == [
        "::error title=dynaudit%3A damage::damage: model.layers.2.o_proj.weight mean distance "
        "+30.00%25 ± 0.10%25 (limit ±25%25)"
    ]
    # The sample: two capacity losses (all layers, bottom third) and one damaged layer.
    titles = [line.split("::")[1] for line in github_annotations(sample_report())]
    assert titles == ["error title=dynaudit%3A capacity loss"] * 2 + [
        "error title=dynaudit%3A damage"
    ]


def test_a_layer_type_named_like_a_third_keeps_its_own_figures() -> None:
    """Regression: JUnit looked each case's figures up by name, thirds first, so a layer type
    named "top" showed the top third's change."""
    comparison = Comparison(
        layers=[_layer("model.layers.0.top.weight", "top", "bottom", 0.001)],
        all=_group(0.001, 1),
        groups={"bottom": _group(0.001, 1), "top": _group(-0.5, 1)},
        types={"top": _group(0.007, 1)},
    )
    report = sample_report().model_copy(update={"comparison": comparison})
    root = ET.fromstring(render_junit(report))
    shown = {case.get("name"): case.findtext("system-out") for case in root.iter("testcase")}
    assert shown["type top"].startswith("change +0.700% ± 0.200%")
    assert shown["top third"].startswith("change -50.000%")
