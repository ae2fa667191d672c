"""What `check` tells a CI system: JUnit XML (one test case per group) and, inside GitHub
Actions, the job summary, the ``verdict`` output and ``::error::`` annotations.

Strings from checkpoints (tensor names, layer types, family notes) and baselines reach every
one of these formats, so each escapes them for its own syntax with the functions of
:mod:`dynaudit.reports.escape`: XML 1.0 (ElementTree then quotes ``& < > "``), workflow
commands (GitHub's percent-encoding: a name with a newline cannot start a second command),
Markdown. The job summary and ``$GITHUB_OUTPUT`` are side channels: failing to write them
costs a warning on stderr, never the verdict's exit code.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path

from dynaudit.errors import printable
from dynaudit.report import CheckReport
from dynaudit.reports.check import render_check_markdown
from dynaudit.reports.escape import escape_command_data, escape_command_property, escape_xml

__all__ = ["escape_command_data", "github_annotations", "render_junit", "report_to_github"]


def _group_cases(report: CheckReport) -> list[tuple[str, str, list[str]]]:
    """(test case name, group key, messages of the findings that fail it): all layers, each
    depth third, each layer type. Names and messages are raw: each format escapes them."""
    comparison = report.comparison
    keys = [("all layers", "all"), *[(f"{g} third", g) for g in comparison.groups]]
    keys += [(f"type {t}", t) for t in comparison.types]
    findings = report.verdict.findings
    return [(label, key, [f.message for f in findings if key in f.groups]) for label, key in keys]


def render_junit(report: CheckReport) -> str:
    """JUnit XML: a test suite for the check, one test case per group."""
    cases = _group_cases(report)
    suite = ET.Element(
        "testsuite",
        name=escape_xml(f"dynaudit check {report.source.uri}"),
        tests=str(len(cases)),
        failures=str(sum(1 for _, _, reasons in cases if reasons)),
        time=f"{report.seconds:.3f}",
    )
    for label, key, reasons in cases:
        case = ET.SubElement(suite, "testcase", classname="dynaudit.check", name=escape_xml(label))
        group = report.comparison.groups.get(key) or report.comparison.types.get(key)
        if key == "all":
            group = report.comparison.all
        if group is not None and group.change is not None:
            ET.SubElement(case, "system-out").text = escape_xml(
                f"change {group.change.mean * 100:+.3f}% ± {group.change.std * 100:.3f}% "
                f"over {group.layers} layers, noise {(group.noise or 0) * 100:.3f}%"
            )
        if reasons:
            escaped = [escape_xml(reason) for reason in reasons]  # one line each
            failure = ET.SubElement(case, "failure", message=escaped[0], type="dynaudit.gate")
            failure.text = "\n".join(escaped)
    ET.indent(suite)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
    )


def github_annotations(report: CheckReport) -> list[str]:
    """One ``::error::`` line per failing group (and one for non-finite weights)."""
    lines = []
    for label, _, reasons in _group_cases(report):
        if reasons:
            title = escape_command_property(f"dynaudit: {label}")
            lines.append(f"::error title={title}::{escape_command_data('; '.join(reasons))}")
    return lines


def _warn(message: str) -> None:
    from dynaudit.secrets import scrub

    print(f"dynaudit: warning: {scrub(printable(message))}", file=sys.stderr, flush=True)


def _append(variable: str, path: str, text: str, warn: Callable[[str], None]) -> None:
    """Append ``text`` to the file a GitHub variable names; an error is a warning."""
    try:
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        warn(f"could not write ${variable} ({path}): {reason}; the verdict stands")


def report_to_github(
    report: CheckReport,
    env: Mapping[str, str] | None = None,
    *,
    warn: Callable[[str], None] = _warn,
) -> list[str]:
    """Inside GitHub Actions: append the Markdown report to ``$GITHUB_STEP_SUMMARY``, write
    ``verdict=pass|fail`` to ``$GITHUB_OUTPUT``; return the annotation lines to print.

    Either file being unwritable (a missing directory, a read-only or full disk) is one
    ``dynaudit: warning:`` line on stderr through ``warn``: the gate's verdict, and so the
    exit code, are the check's, not the side channel's."""
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTIONS", "").lower() != "true":
        return []
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        _append("GITHUB_STEP_SUMMARY", summary, render_check_markdown(report) + "\n", warn)
    if output := env.get("GITHUB_OUTPUT"):
        _append("GITHUB_OUTPUT", output, f"verdict={report.verdict.verdict}\n", warn)
    return github_annotations(report)
