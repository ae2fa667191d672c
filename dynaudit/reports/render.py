"""One way out for every report: :func:`render_report` owns the output and a :class:`Reporter`
only turns a document into text or bytes.

The output is a file written atomically, or standard output for ``-``
(:mod:`dynaudit.files`): no renderer opens a file, so none can leave half a report,
replace a directory, or write twice to one path. The terminal tables are reporters too: they
are drawn by rich into a string, with the colours and width of the real standard output, and
then written to ``-`` like any report."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel
from rich.console import Console

from dynaudit.files import write_bytes_atomic, write_text_atomic
from dynaudit.outputs import STDOUT, Inputs, guard_outputs, is_stdout

__all__ = [
    "JSON",
    "Reporter",
    "Terminal",
    "Text",
    "publish",
    "render_report",
    "show",
]

_Doc = TypeVar("_Doc", contravariant=True)
_D = TypeVar("_D")


class Reporter(Protocol[_Doc]):
    """One format of a document: the whole file, as text (UTF-8) or bytes (a PNG)."""

    def render(self, document: _Doc) -> str | bytes:
        """The document in this format, complete: nothing is written until it is."""
        ...


def render_report(path: str | os.PathLike[str], reporter: Reporter[_D], document: _D) -> Path:
    """Render ``document`` and write it to ``path`` (``-``: standard output) atomically;
    returns the path written."""
    data = reporter.render(document)
    if isinstance(data, bytes):
        return write_bytes_atomic(path, data)
    return write_text_atomic(path, data)


@dataclass(frozen=True)
class _Json:
    """Any schema model as its JSON document (two-space indent, a final newline)."""

    def render(self, document: BaseModel) -> str:
        return document.model_dump_json(indent=2) + "\n"


JSON = _Json()


@dataclass(frozen=True)
class Text(Generic[_D]):
    """A text format drawn by a function of the document (Markdown, JUnit XML)."""

    draw: Callable[[_D], str]

    def render(self, document: _D) -> str:
        return self.draw(document)


def _terminal_console() -> Console:
    """A console for standard output; logs and pipes get a wide table rather than rich's
    80-column default."""
    return Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True)
class Terminal(Generic[_D]):
    """A rich drawing of the document, as the terminal on standard output would show it
    (its colours and width); meant for ``-``."""

    draw: Callable[[_D, Console], None]

    def render(self, document: _D) -> str:
        console = _terminal_console()
        with console.capture() as captured:
            self.draw(document, console)
        return captured.get()


def show(reporter: Reporter[_D], document: _D) -> None:
    """``document`` on standard output."""
    render_report(STDOUT, reporter, document)


def publish(
    document: _D,
    files: Mapping[str, tuple[str | os.PathLike[str] | None, Reporter[_D]]],
    inputs: Inputs,
    table: Reporter[_D] | None,
) -> bool:
    """Write each report file asked for (by flag: its path, None when not asked for, and its
    format), then ``table`` on standard output unless a report went there. Every output is
    first checked against what the run read (:func:`~dynaudit.outputs.guard_outputs`).
    Returns whether standard output holds a report."""
    guard_outputs({flag: path for flag, (path, _) in files.items()}, inputs)
    for path, reporter in files.values():
        if path is not None:
            render_report(path, reporter, document)
    to_stdout = any(is_stdout(path) for path, _ in files.values())
    if table is not None and not to_stdout:
        show(table, document)
    return to_stdout
