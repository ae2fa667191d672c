"""One escaping function per output medium, for every string dynaudit did not write itself.

Tensor names, layer types, family notes, paths, URIs and server messages come from
checkpoints, configs, plugins and users: any of them may hold a line break, an ANSI
sequence (``"\\x1b[2K\\x1b[1Gverdict: PASS"`` erases a terminal line and forges a verdict),
BEL, a BiDi override that makes a name read backwards, or a character XML cannot carry.
Every rendering of such text goes through exactly one function here:

==========================  ==========================================================
medium                      function
==========================  ==========================================================
terminal, one-line message  :func:`escape_terminal` (= :func:`~dynaudit.errors.printable`),
                            :func:`plain` and :func:`print_plain` for rich (never
                            parsed as markup, never wrapped into a line of its own)
JUnit XML                   :func:`escape_xml` (ElementTree escapes ``& < > "``)
GitHub workflow commands    :func:`escape_command_data`, :func:`escape_command_property`
Markdown                    :func:`escape_markdown` (text, table cells),
                            :func:`markdown_code` (inline code)
==========================  ==========================================================

All start from :func:`~dynaudit.errors.printable`, which shows every control and invisible
format character as a visible escape (``\\n``, ``\\x1b``, ``\\u202e``), so one name reads
the same in the terminal, the step summary, the annotations and the JUnit file; each then
adds its own syntax's escaping.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.text import Text

from dynaudit.errors import printable

__all__ = [
    "escape_command_data",
    "escape_command_property",
    "escape_markdown",
    "escape_terminal",
    "escape_xml",
    "markdown_code",
    "plain",
    "print_plain",
]

escape_terminal = printable


def plain(text: str, style: str = "") -> Text:
    """Untrusted text for a rich console or table: escaped for the terminal and never parsed
    as rich markup (``[red]`` stays text)."""
    return Text(escape_terminal(text), style=style)


def escape_xml(text: str) -> str:
    """Text or an attribute value for an XML 1.0 document: no character XML forbids (most
    C0 controls, lone surrogates, U+FFFE/U+FFFF) and none a parser would alter (CR), nor
    ESC, BEL or BiDi controls. ``& < > "`` are left to the serializer (ElementTree)."""
    return printable(text)


def escape_command_data(text: str) -> str:
    """The message of a GitHub workflow command (``::error::MESSAGE``): ``%``, CR and LF
    percent-encoded as the runner expects, so no string can end the command or start another
    one; other controls (ESC, BEL), BiDi and invisible characters shown as escapes."""
    encoded = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return printable(encoded)


def escape_command_property(text: str) -> str:
    """A property value of a workflow command (``title=VALUE``): the data escaping plus ``:``
    and ``,``, which would end the value."""
    return escape_command_data(text).replace(":", "%3A").replace(",", "%2C")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&$])")


def escape_markdown(text: str) -> str:
    """Untrusted text inert in Markdown prose or a table cell (GitHub-flavoured): on one
    line, and no emphasis, code, link, heading, HTML, entity or cell separator survives."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(str(text)))


_BACKTICKS = re.compile(r"`+")


def markdown_code(text: str, *, in_table: bool = False) -> str:
    """Untrusted text as a Markdown code span. Backslash escapes do not work inside code, so
    the span is fenced with more backticks than the text's longest run (and padded when the
    text starts or ends with one). ``in_table``: ``|`` escaped, as a GFM table cell needs
    even inside code."""
    body = printable(str(text)) or " "
    if in_table:
        body = body.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(body)), default=0) + 1)
    edge_spaces = body.strip(" ") and body.startswith(" ") and body.endswith(" ")
    if body.startswith("`") or body.endswith("`") or edge_spaces:
        body = f" {body} "  # CommonMark strips one space from each end
    return f"{fence}{body}{fence}"


def print_plain(console: Console, text: str, style: str = "") -> None:
    """One line of untrusted text on a rich console, escaped and never wrapped: a line that
    rich wrapped at a space could begin with a crafted ``::error::`` (the runner ignores
    leading blanks), so titles and captions holding names are printed this way, not as a
    table's title."""
    console.print(plain(text, style), soft_wrap=True)
