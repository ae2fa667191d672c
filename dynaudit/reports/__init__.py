"""The renderers: each output format of a measure report, check report, inspection or
baseline is a :class:`~dynaudit.reports.render.Reporter`, and
:func:`~dynaudit.reports.render.render_report` is the one way any of them reaches a file or
standard output (JSON, Markdown, JUnit XML, the rich tables, the PNG plots)."""

from dynaudit.reports.markdown import escape_markdown, render_markdown
from dynaudit.reports.render import JSON, Reporter, Terminal, Text, render_report
from dynaudit.reports.terminal import render_terminal

__all__ = [
    "JSON",
    "Reporter",
    "Terminal",
    "Text",
    "escape_markdown",
    "render_markdown",
    "render_report",
    "render_terminal",
]
