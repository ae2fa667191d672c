"""dynaudit's own cache: measured reports keyed by what determines them, and file hashes.

Layout under the cache root (``--cache-dir``, ``DYNAUDIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/dynaudit`` or ``~/.cache/dynaudit``)::

    results/<key[:2]>/<key>/report.json   one entry per checkpoint fingerprint + settings
    hashes/<id>                           sha256 of a file, keyed by its path, size and mtime
    mlflow/<key>/                         files downloaded from MLflow (see sources.mlflow)

Every entry is written under a temporary name and renamed into place when complete, so a
reader never sees half an entry, and two processes storing the same key at once both succeed
(the second rename loses harmlessly). An entry that fails to parse is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynaudit.report import Report
from dynaudit.tensors import sha256_file

__all__ = ["ResultCache", "cache_root", "result_key"]

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("DYNAUDIT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynaudit"


def result_key(
    fingerprint: Mapping[str, str],
    settings: Mapping[str, Any],
    *,
    family: str | None,
    scales: Mapping[str, float] | None,
    version: str,
    protocol: int,
) -> str:
    """What determines a report's numbers: the files' contents, the settings that change the
    numbers, the requested family, reference scales, the protocol and the tool version."""
    material = {
        "files": dict(sorted(fingerprint.items())),
        "settings": dict(sorted(settings.items())),
        "family": family,
        "scales": dict(sorted(scales.items())) if scales else None,
        "protocol": protocol,
        "version": version,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class ResultCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, key: str) -> Path:
        return self.root / "results" / key[:2] / key

    def load(self, key: str) -> Report | None:
        entry = self._entry(key)
        try:
            text = (entry / REPORT_FILE).read_text(encoding="utf-8")
        except OSError:
            return None
        try:
            return Report.model_validate_json(text)
        except ValidationError:
            log.warning("ignoring an unreadable cache entry %s", entry)
            self._discard(entry)
            return None

    def store(self, key: str, report: Report) -> None:
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = entry.parent / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_synced(staging / REPORT_FILE, report.model_dump_json(indent=1))
            try:
                staging.rename(entry)
            except OSError:
                if (entry / REPORT_FILE).is_file():
                    return  # stored by another process meanwhile: theirs is as good
                self._discard(entry)  # a broken leftover: replace it
                staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def digest(self, path: Path) -> str:
        """sha256 of ``path``, remembered by (real path, size, mtime, inode) so an unchanged
        multi-GB checkpoint is hashed once."""
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_dev}"
        memo = self.root / "hashes" / hashlib.sha256(ident.encode()).hexdigest()
        try:
            known = memo.read_text(encoding="ascii").strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
        value = sha256_file(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        temporary = memo.with_name(f".tmp-{uuid.uuid4().hex}")
        _write_synced(temporary, value)
        os.replace(temporary, memo)
        return value

    def _discard(self, entry: Path) -> None:
        trash = entry.with_name(f".trash-{uuid.uuid4().hex}")
        try:
            entry.rename(trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
