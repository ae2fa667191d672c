"""dynaudit's own cache: measured reports keyed by what determines them, and file hashes.

Layout under the cache root (``--cache-dir``, ``DYNAUDIT_CACHE_DIR``, else ``dynaudit/`` in
huggingface_hub's assets folder when ``HF_HOME`` or ``HF_ASSETS_CACHE`` is set, else
``$XDG_CACHE_HOME/dynaudit`` or ``~/.cache/dynaudit``; see :func:`cache_root`)::

    results/<key[:2]>/<key>/report.json   one entry per checkpoint fingerprint + settings
    hashes/<id>                           sha256 of a file, keyed by its path, size and mtime
    mlflow/<key>/                         files downloaded from MLflow (see sources.mlflow)

Every entry is written under a temporary name and renamed into place when complete, so a
reader never sees half an entry, and two processes storing the same key at once both succeed
(the second rename loses harmlessly). An entry that fails to parse is ignored and replaced.
What a killed process left under a temporary name is swept by the next write beside it, once
more than a day old (:func:`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynaudit.schema import Report
from dynaudit.tensors import sha256_file

__all__ = ["ResultCache", "cache_root", "publish_dir", "result_key", "sweep_stale"]

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# dynaudit's own temporary names, and only those: ``.tmp-<uuid>`` (cache entries, hash memos,
# downloads, converted pickles), ``.<name>.tmp-<uuid>`` (a baseline staged beside --out) and
# ``.trash-<uuid>`` (an entry being deleted).
_TEMPORARY = re.compile(r"\.(?:.+\.)?tmp-[0-9a-f]{32}|\.trash-[0-9a-f]{32}", re.DOTALL)
STALE_SECONDS = 24 * 3600


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


def publish_dir(staging: Path, final: Path) -> bool:
    """Rename a complete ``staging`` folder to ``final``; False when another process published
    ``final`` first (``staging`` is then removed). Either way ``final`` is whole afterwards."""
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if final.is_dir():
            return False
        raise
    sweep_stale(final.parent)
    return True


def sweep_stale(parent: Path, now: float | None = None) -> None:
    """Remove what killed dynaudit processes left in ``parent``: entries with dynaudit's own
    temporary names (never anything else; no symlink, FIFO or other special file either) not
    changed for more than a day. A live staging directory is younger: its newest change is
    taken over it and its direct children (a baseline's coords/ gains a file per layer).
    Best effort: whatever cannot be listed or removed stays."""
    limit = (time.time() if now is None else now) - STALE_SECONDS
    try:
        entries = [entry for entry in os.scandir(parent) if _TEMPORARY.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if _newest_change(entry.path, info.st_mtime) < limit:
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            continue


def _newest_change(folder: str, mtime: float) -> float:
    with os.scandir(folder) as children:
        return max([mtime, *(c.stat(follow_symlinks=False).st_mtime for c in children)])


def discard_dir(entry: Path) -> None:
    """Remove a damaged cache entry: renamed aside first (one atomic step, so no reader sees
    it half deleted), then deleted."""
    trash = entry.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        entry.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


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
        staging = entry.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            staging.mkdir(parents=True)
            _write_synced(staging / REPORT_FILE, report.model_dump_json(indent=1))
            if entry.is_dir() and not (entry / REPORT_FILE).is_file():
                discard_dir(entry)  # a broken leftover: replace it
            publish_dir(staging, entry)
        except OSError as exc:
            log.warning("could not write the result cache at %s: %s", self.root, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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
        temporary = memo.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(temporary, value)
            os.replace(temporary, memo)
            sweep_stale(memo.parent)
        except OSError as exc:
            log.warning("could not write the hash memo at %s: %s", memo.parent, exc)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        return value


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
