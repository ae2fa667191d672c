"""Whether a person is watching: progress bars on an interactive terminal, none in CI logs."""

from __future__ import annotations

import os
import sys

__all__ = ["interactive"]


def interactive() -> bool:
    """stderr is a terminal and ``CI`` is not set (to anything but ``0``/``false``)."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return sys.stderr.isatty() and not ci
