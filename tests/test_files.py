"""dynaudit.files: the one module that writes files and publishes staged directories."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from dynaudit.files import (
    STALE_SECONDS,
    publish_dir,
    replace_file,
    stage_dir,
    staged_dir,
    sweep_stale,
)


def _staged(final: Path) -> Path:
    staging = stage_dir(final)
    (staging / "part").write_text("complete")
    return staging


def test_a_staged_directory_is_published_whole(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    staging = _staged(final)
    assert staging.parent == tmp_path and staging.name.startswith(".entry.tmp-")
    assert publish_dir(staging, final)
    assert (final / "part").read_text() == "complete" and not staging.exists()


def test_a_directory_published_first_wins_and_the_staging_is_dropped(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "theirs").write_text("kept")
    staging = _staged(final)
    assert not publish_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["theirs"] and not staging.exists()


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_publishing_over_something_that_is_not_a_directory_raises(
    tmp_path: Path, kind: str
) -> None:
    """Not a silent "someone else published it": a file or a dangling link where the
    directory should go is an error the caller reports, and it is left as it was."""
    final = tmp_path / "entry"
    if kind == "file":
        final.write_text("user data")
    else:
        final.symlink_to(tmp_path / "nowhere")
    staging = _staged(final)
    with pytest.raises(FileExistsError):
        publish_dir(staging, final)
    assert not staging.exists()
    assert final.is_symlink() if kind != "file" else final.read_text() == "user data"


def test_a_staged_directory_left_unpublished_is_removed(tmp_path: Path) -> None:
    with staged_dir(tmp_path / "entry") as staging:
        (staging / "part").write_text("half")
    assert list(tmp_path.iterdir()) == []


def test_replace_file_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    replace_file(target, b"new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_replace_file_never_replaces_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out"
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        (tmp_path / "real").write_text("user data")
        target.symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError):
        replace_file(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", *(["real"] if kind == "symlink" else [])]
    )
    if kind == "symlink":
        assert (tmp_path / "real").read_text() == "user data"


def test_sweep_removes_only_old_entries_with_dynaudit_temporary_names(tmp_path: Path) -> None:
    old = time.time() - STALE_SECONDS - 60
    stale = _staged(tmp_path / "entry")
    fresh = _staged(tmp_path / "other")
    foreign = tmp_path / ".entry.tmp-not-ours"
    foreign.mkdir()
    for path in (stale, stale / "part", foreign):
        os.utime(path, (old, old))
    sweep_stale(tmp_path)
    assert not stale.exists()
    assert fresh.exists() and foreign.exists()
