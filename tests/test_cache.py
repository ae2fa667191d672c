"""The result cache: a second measure of the same bytes and settings is read back, not
refitted; the key covers everything that changes the numbers; concurrent runs, a corrupt entry
or an unwritable cache never cost a report; where the cache lives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dynaudit
from dynaudit.schema import Report
from dynaudit.sources import SourceOptions
from tests.cli import run_cli
from tests.conftest import figures

FAST = {"q_dim": 16, "pieces": 4, "steps": 60}
FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "60"]


def test_a_second_measure_hits_the_cache(sharded_llama: Path) -> None:
    settings = {"q_dim": 32, "pieces": 8, "steps": 150}
    first = dynaudit.measure(sharded_llama, **settings)
    started = time.perf_counter()
    second = dynaudit.measure(sharded_llama, **settings)
    elapsed = time.perf_counter() - started
    assert first.cache is not None and not first.cache.hit
    assert second.cache is not None and second.cache.hit
    assert second.cache.key == first.cache.key
    assert figures(second) == figures(first)
    assert elapsed < first.seconds / 5, (elapsed, first.seconds)
    other = dynaudit.measure(sharded_llama, **{**settings, "seed": 1})
    assert other.cache is not None and not other.cache.hit
    fresh = dynaudit.measure(sharded_llama, cache=False, **settings)
    assert fresh.cache is None and figures(fresh) == figures(first)


def test_the_cli_says_when_it_used_the_cache(digits_mlp: Path, tmp_path: Path) -> None:
    first = run_cli("measure", str(digits_mlp), *FAST_FLAGS)
    second = run_cli("measure", str(digits_mlp), *FAST_FLAGS, "--markdown", str(tmp_path / "r.md"))
    assert first.returncode == second.returncode == 0
    assert "result cache hit" not in first.stdout
    assert "result cache hit" in second.stdout and "--no-cache" in second.stdout
    assert "result cache hit" in (tmp_path / "r.md").read_text()


def test_concurrent_runs_share_the_cache_safely(digits_mlp: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CI": "true"}
    command = [sys.executable, "-m", "dynaudit", "measure", str(digits_mlp), *FAST_FLAGS]
    runs = [
        subprocess.Popen(
            [*command, "--json", str(tmp_path / f"{i}.json"), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = (Report.model_validate_json((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert figures(a) == figures(b)
    entries = list(Path(os.environ["DYNAUDIT_CACHE_DIR"]).glob("results/*/*/report.json"))
    assert len(entries) == 1
    Report.model_validate_json(entries[0].read_text())
    assert not list(Path(os.environ["DYNAUDIT_CACHE_DIR"]).glob("results/*/.*tmp-*"))


@pytest.mark.parametrize("garbage", [b'{"truncated": ', b"\xff\xfe not utf-8"])
def test_a_corrupt_cache_entry_is_replaced(digits_mlp: Path, garbage: bytes) -> None:
    first = dynaudit.measure(digits_mlp, **FAST)
    assert first.cache is not None
    cache = Path(os.environ["DYNAUDIT_CACHE_DIR"])
    entry = cache / "results" / first.cache.key[:2] / first.cache.key / "report.json"
    entry.write_bytes(garbage)
    for memo in (cache / "hashes").iterdir():
        memo.write_bytes(garbage)
    again = dynaudit.measure(digits_mlp, **FAST)
    assert again.cache is not None and not again.cache.hit
    assert figures(again) == figures(first)
    assert Report.model_validate_json(entry.read_text()).cache is not None


def test_an_unwritable_cache_costs_a_warning_not_the_report(
    digits_mlp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    options = SourceOptions(cache_dir=blocked / "cache")
    report = dynaudit.measure(digits_mlp, sources=options, **FAST)
    assert report.measured and "could not write" in caplog.text


def test_the_cache_key_covers_the_config(digits_mlp: Path, tmp_path: Path) -> None:
    """Family plugins read config.json (head counts, tying): a changed config is a new key."""
    copy = shutil.copytree(digits_mlp, tmp_path / "copy")
    first = dynaudit.measure(copy, **FAST)
    config = (
        json.loads((copy / "config.json").read_text()) if (copy / "config.json").exists() else {}
    )
    (copy / "config.json").write_text(json.dumps({**config, "edited": True}))
    second = dynaudit.measure(copy, **FAST)
    assert first.cache is not None and second.cache is not None
    assert not second.cache.hit and second.cache.key != first.cache.key


def test_the_cache_sits_beside_the_hugging_face_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With HF_HOME moved (a scratch disk), dynaudit's cache follows it, into the assets
    folder huggingface_hub keeps for other libraries; never inside hub/."""
    from dynaudit.cache import cache_root

    monkeypatch.delenv("DYNAUDIT_CACHE_DIR")
    monkeypatch.delenv("HF_ASSETS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = Path(os.environ["HF_HOME"])
    assert cache_root() == home / "assets" / "dynaudit"
    monkeypatch.setenv("HF_ASSETS_CACHE", str(tmp_path / "assets"))
    assert cache_root() == tmp_path / "assets" / "dynaudit"
    shared = tmp_path / "team-hf"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # a team's cache: results and hash memos are not kept where others write
    monkeypatch.setenv("HF_ASSETS_CACHE", str(shared / "assets"))
    assert cache_root() == tmp_path / "xdg" / "dynaudit"
    monkeypatch.setenv("DYNAUDIT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and cache_root(tmp_path / "flag") == tmp_path / "flag"
    for var in ("DYNAUDIT_CACHE_DIR", "HF_ASSETS_CACHE", "HF_HOME"):
        monkeypatch.delenv(var)
    assert cache_root() == tmp_path / "xdg" / "dynaudit"
