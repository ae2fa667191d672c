"""Atomic file output: a reader never sees half a report, and a failure leaves no debris."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dynaudit.report import Report

__all__ = ["write_json", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json(report: Report, path: str | os.PathLike[str]) -> Path:
    return write_text_atomic(path, report.model_dump_json(indent=2) + "\n")
