"""What `check` tells a CI system: JUnit XML (one test case per group) and, inside GitHub
Actions, the job summary, the ``verdict`` output and ``::error::`` annotations.

Strings from checkpoints (tensor names, family notes) reach every one of these formats, so
each escapes them for its own syntax: XML through ElementTree, workflow commands with
GitHub's percent-encoding (a name with a newline cannot start a second command), Markdown
through :func:`~dynaudit.reports.markdown.escape_markdown`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from dynaudit.report import CheckReport
from dynaudit.reports.check import render_check_markdown

__all__ = ["escape_command_data", "github_annotations", "render_junit", "report_to_github"]


def _group_cases(report: CheckReport) -> list[tuple[str, str, list[str]]]:
    """(test case name, group key, messages of the findings that fail it): all layers, each
    depth third, each layer type."""
    comparison = report.comparison
    keys = [("all layers", "all"), *[(f"{g} third", g) for g in comparison.groups]]
    keys += [(f"type {t}", t) for t in comparison.types]
    findings = report.verdict.findings
    return [(label, key, [f.message for f in findings if key in f.groups]) for label, key in keys]


def _xml_safe(text: str) -> str:
    """XML 1.0 cannot carry most control characters (and parsers turn CR into LF): show them
    as escapes instead of writing an invalid or altered document."""
    return "".join(ch if ch in "\n\t" or ord(ch) >= 0x20 else f"\\x{ord(ch):02x}" for ch in text)


def render_junit(report: CheckReport) -> str:
    """JUnit XML: a test suite for the check, one test case per group."""
    cases = _group_cases(report)
    suite = ET.Element(
        "testsuite",
        name=_xml_safe(f"dynaudit check {report.source.uri}"),
        tests=str(len(cases)),
        failures=str(sum(1 for _, _, reasons in cases if reasons)),
        time=f"{report.seconds:.3f}",
    )
    for label, key, reasons in cases:
        case = ET.SubElement(suite, "testcase", classname="dynaudit.check", name=label)
        group = report.comparison.groups.get(key) or report.comparison.types.get(key)
        if key == "all":
            group = report.comparison.all
        if group is not None and group.change is not None:
            ET.SubElement(case, "system-out").text = (
                f"change {group.change.mean * 100:+.3f}% ± {group.change.std * 100:.3f}% "
                f"over {group.layers} layers, noise {(group.noise or 0) * 100:.3f}%"
            )
        if reasons:
            first = _xml_safe(reasons[0]).replace("\n", " ")
            failure = ET.SubElement(case, "failure", message=first, type="dynaudit.gate")
            failure.text = _xml_safe("\n".join(reasons))
    ET.indent(suite)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
    )


def escape_command_data(text: str) -> str:
    """GitHub workflow-command escaping of a message: ``%``, CR and LF percent-encoded, so no
    string can end the command or start another one."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return escape_command_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(report: CheckReport) -> list[str]:
    """One ``::error::`` line per failing group (and one for non-finite weights)."""
    lines = []
    for label, _, reasons in _group_cases(report):
        if reasons:
            title = _escape_property(f"dynaudit: {label}")
            lines.append(f"::error title={title}::{escape_command_data('; '.join(reasons))}")
    return lines


def report_to_github(report: CheckReport, env: Mapping[str, str] | None = None) -> list[str]:
    """Inside GitHub Actions: append the Markdown report to ``$GITHUB_STEP_SUMMARY``, write
    ``verdict=pass|fail`` to ``$GITHUB_OUTPUT``; return the annotation lines to print."""
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTIONS", "").lower() != "true":
        return []
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        with Path(summary).open("a", encoding="utf-8") as fh:
            fh.write(render_check_markdown(report) + "\n")
    if output := env.get("GITHUB_OUTPUT"):
        with Path(output).open("a", encoding="utf-8") as fh:
            fh.write(f"verdict={report.verdict.verdict}\n")
    return github_annotations(report)
