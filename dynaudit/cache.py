"""dynaudit's own cache: measured reports keyed by what determines them, and file hashes.

Layout under the cache root (``--cache-dir``, ``DYNAUDIT_CACHE_DIR``, else ``dynaudit/`` in
huggingface_hub's assets folder when ``HF_HOME`` or ``HF_ASSETS_CACHE`` is set, else
``$XDG_CACHE_HOME/dynaudit`` or ``~/.cache/dynaudit``; see :func:`cache_root`)::

    results/<key[:2]>/<key>/report.json   one entry per checkpoint fingerprint + settings
    hashes/<id>                           sha256 of a file, keyed by its path, size and mtime
    mlflow/<key>/                         files downloaded from MLflow (see sources.mlflow)

Every entry is written under a temporary name and renamed into place when complete
(:mod:`dynaudit.files`), so a reader never sees half an entry, and two processes storing the
same key at once both succeed (the second one's entry is dropped harmlessly). An entry that
fails to parse is ignored and replaced. What a killed process left under a temporary name is
swept by the next write beside it, once more than a day old
(:func:`dynaudit.files.sweep_stale`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynaudit.files import (
    discard_dir,
    publish_dir,
    replace_file,
    staged_dir,
    sweep_stale,
    write_new,
)
from dynaudit.schema import Report
from dynaudit.tensors import sha256_file

__all__ = ["ResultCache", "cache_root", "result_key"]

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """Where dynaudit caches: ``configured``, else ``DYNAUDIT_CACHE_DIR``, else — when the
    user moved the Hugging Face cache with ``HF_HOME`` (a cluster's scratch disk, say) — the
    ``assets/`` folder huggingface_hub sets aside there for other libraries
    (``HF_ASSETS_CACHE``, default ``$HF_HOME/assets``: its ``cached_assets_path``), else
    ``$XDG_CACHE_HOME/dynaudit``. The HF folder only when it is the user's own and no one
    else can write in it (see :func:`_private`). Not inside ``hub/``: that layout belongs to
    huggingface_hub, and its cache scanner reports foreign folders there as corrupt."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("DYNAUDIT_CACHE_DIR"):
        return Path(env).expanduser()
    assets = os.environ.get("HF_ASSETS_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "assets") if os.environ.get("HF_HOME") else ""
    )
    if assets and _private(Path(assets).expanduser()):
        return Path(assets).expanduser() / "dynaudit"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynaudit"


def _private(folder: Path) -> bool:
    """The first existing folder at or above ``folder`` is this user's and no one else can
    write in it. A shared Hugging Face cache (a team's HF_HOME) is not a place for results
    and file-hash memos another user could plant: those stay in the user's own cache."""
    for place in (folder, *folder.parents):
        try:
            st = place.stat()
        except FileNotFoundError:
            continue
        except OSError:
            return False
        own = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        return own and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return False


def result_key(
    fingerprint: Mapping[str, str],
    settings: Mapping[str, Any],
    *,
    family: str | None,
    scales: Mapping[str, float] | None,
    version: str,
    protocol: int,
    context: Mapping[str, Any],
) -> str:
    """What determines a report's numbers: the weight files' contents, the settings that change
    the numbers, the requested family, reference scales, the protocol and the tool version, and
    ``context`` — the checkpoint's config, how an adapter is merged, the installed plugins."""
    material = {
        "files": dict(sorted(fingerprint.items())),
        "settings": dict(sorted(settings.items())),
        "family": family,
        "scales": dict(sorted(scales.items())) if scales else None,
        "protocol": protocol,
        "version": version,
        "context": context,
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, key: str) -> Path:
        return self.root / "results" / key[:2] / key

    def load(self, key: str) -> Report | None:
        """The stored report, or None. An entry that does not parse is moved aside."""
        entry = self._entry(key)
        try:
            data = (entry / REPORT_FILE).read_bytes()
        except OSError:
            return None
        try:
            return Report.model_validate_json(data)
        except (ValidationError, ValueError, RecursionError):
            log.warning("ignoring an unreadable cache entry %s", entry)
            discard_dir(entry)
            return None

    def store(self, key: str, report: Report) -> None:
        """Best effort: a cache that cannot be written costs a warning, never the report."""
        entry = self._entry(key)
        try:
            with staged_dir(entry) as staging:
                write_new(staging / REPORT_FILE, report.model_dump_json(indent=1).encode())
                if entry.is_dir() and not (entry / REPORT_FILE).is_file():
                    discard_dir(entry)  # a broken leftover: replace it
                publish_dir(staging, entry)
        except OSError as exc:
            log.warning("could not write the result cache at %s: %s", self.root, exc)

    def digest(self, path: Path) -> str:
        """sha256 of ``path``, remembered by (real path, size, mtime, inode) so an unchanged
        multi-GB checkpoint is hashed once. The memo is best effort: if it cannot be read or
        written, the file is simply hashed."""
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_dev}"
        memo = self.root / "hashes" / hashlib.sha256(ident.encode()).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            known = memo.read_bytes().decode("ascii").strip()
            if _SHA256.fullmatch(known):
                return known
        value = sha256_file(path)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(memo.parent)
            replace_file(memo, value.encode("ascii"))
        except OSError as exc:
            log.warning("could not write the hash memo at %s: %s", memo.parent, exc)
        return value
