"""Renderers of a :class:`~dynaudit.report.Report`: JSON, Markdown, rich terminal table."""

from dynaudit.reports.markdown import escape_markdown, render_markdown
from dynaudit.reports.terminal import render_terminal
from dynaudit.reports.writers import write_json, write_text_atomic

__all__ = [
    "escape_markdown",
    "render_markdown",
    "render_terminal",
    "write_json",
    "write_text_atomic",
]
