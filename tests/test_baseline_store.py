"""A baseline is a closed world (issue 18): every file baseline.json names is in the manifest
and inside the directory, every coordinate file holds the tensors its layer calls for, every
number is finite; anything else is exit 3 "tampered or corrupt", never a hang or exit 4.
Also: newer baseline formats refused by name, and stale staging directories swept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import dynaudit
from dynaudit.baseline_store import expected_coords, load_baseline, read_coords
from dynaudit.cli import main
from dynaudit.config import PROTOCOL_VERSION
from dynaudit.errors import BaselineError
from dynaudit.schema import BASELINE_FORMAT
from tests import producers

FIT: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 30, "warm_steps": 10, "seeds": 2}
DAY = 24 * 3600


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA saved by transformers (q_proj and o_proj share a shape: 32 × 32)."""
    return producers.llama(tmp_path_factory.mktemp("llama") / "model", dtype=torch.float32)


@pytest.fixture(scope="module")
def stored(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "base"
    dynaudit.baseline(model, out, **FIT)
    return out


@pytest.fixture
def copy(stored: Path, tmp_path: Path) -> Path:
    return shutil.copytree(stored, tmp_path / "baseline")


def check(model: Path, baseline: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``dynaudit check`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(["check", str(model), "--baseline", str(baseline), "--no-cache"])
    return code, capsys.readouterr().err


def assert_tampered(code: int, err: str, *needles: str) -> None:
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1, err
    assert "tampered or corrupt" in err, err
    for needle in needles:
        assert needle in err, err


def manifest(baseline: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((baseline / "manifest.json").read_text())
    return data


def sign(baseline: Path, *names: str) -> None:
    """Re-hash ``names`` into the manifest, as a careless tool (or an attacker) would."""
    entries = manifest(baseline)
    for name in names:
        entries[name] = hashlib.sha256((baseline / name).read_bytes()).hexdigest()
    (baseline / "manifest.json").write_text(json.dumps(entries, indent=1))


def edit_json(baseline: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((baseline / "baseline.json").read_text())
    change(data)
    (baseline / "baseline.json").write_text(json.dumps(data))
    sign(baseline, "baseline.json")


def coords_of(baseline: Path, kind: str = "q_proj") -> tuple[dict[str, Any], Path]:
    """The first fitted layer whose name holds ``kind``, and its coordinate file."""
    data = json.loads((baseline / "baseline.json").read_text())
    layer = next(x for x in data["layers"] if x["coords"] and kind in x["name"])
    return layer, baseline / layer["coords"]


def test_an_intact_baseline_loads_and_passes(
    model: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = load_baseline(stored)
    assert baseline.format_version == BASELINE_FORMAT
    fitted = [x for x in baseline.layers if x.coords is not None]
    assert fitted
    for layer in fitted:
        tensors = read_coords(stored, baseline, layer)
        want = expected_coords(layer, baseline.seeds, baseline.fit_settings())
        assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    assert check(model, stored, capsys)[0] == 0


def test_swapped_coords_with_their_manifest_lines_removed(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two same-shape coordinate files swapped, their manifest lines deleted: the manifest
    no longer vouches for files that baseline.json names."""
    data = json.loads((copy / "baseline.json").read_text())
    by_shape: dict[str, list[str]] = {}
    for layer in data["layers"]:
        if layer["coords"]:
            by_shape.setdefault(str(layer["shape"]), []).append(layer["coords"])
    a, b = next(files for files in by_shape.values() if len(files) > 1)[:2]
    swap = copy / "swap.tmp"
    (copy / a).rename(swap)
    (copy / b).rename(copy / a)
    swap.rename(copy / b)
    entries = manifest(copy)
    del entries[a], entries[b]
    (copy / "manifest.json").write_text(json.dumps(entries))
    code, err = check(model, copy, capsys)
    assert_tampered(code, err, "not in manifest.json")


def test_swapped_coords_re_signed_are_caught_by_their_layer_name(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same swap with the manifest re-hashed: each file names the layer it belongs to."""
    data = json.loads((copy / "baseline.json").read_text())
    queries = [x["coords"] for x in data["layers"] if x["coords"] and "q_proj" in x["name"]]
    a, b = queries[:2]
    raw_a, raw_b = (copy / a).read_bytes(), (copy / b).read_bytes()
    (copy / a).write_bytes(raw_b)
    (copy / b).write_bytes(raw_a)
    sign(copy, a, b)
    assert_tampered(*check(model, copy, capsys), "holds the coordinates of")


def test_an_unlisted_file_in_coords_is_refused_but_os_litter_is_not(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (copy / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (copy / "coords" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (copy / "README.md").write_text("the base model's baseline\n")
    assert check(model, copy, capsys)[0] == 0
    shutil.copy(
        next((copy / "coords").glob("0*.safetensors")), copy / "coords" / "99999.safetensors"
    )
    assert_tampered(*check(model, copy, capsys), "99999.safetensors", "not in manifest.json")


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "coords/../../x"])
def test_coords_outside_the_directory(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    """Whether or not the path is also added to the manifest, nothing outside is opened."""
    layer, _ = coords_of(copy)

    def point(data: dict[str, Any]) -> None:
        next(x for x in data["layers"] if x["name"] == layer["name"])["coords"] = target

    edit_json(copy, point)
    assert_tampered(*check(model, copy, capsys), "outside the baseline directory")
    entries = manifest(copy)
    entries[target] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(entries))
    assert_tampered(*check(model, copy, capsys), "outside the baseline directory")


def test_a_symlink_leading_out_of_the_directory(
    model: Path, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinate file replaced by a link to an identical copy outside: refused, though
    its sha256 matches."""
    _, file = coords_of(copy)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(file, outside)
    file.unlink()
    file.symlink_to(outside)
    assert_tampered(*check(model, copy, capsys), "leads outside the baseline directory")


def test_wrong_shape_coords(model: Path, copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer, file = coords_of(copy)
    tensors = load_file(str(file))
    tensors["cold.0"] = tensors["cold.0"][:, :, :-1].contiguous()  # one neuron short
    save_file(tensors, str(file), metadata={"dynaudit.layer": layer["name"]})
    sign(copy, layer["coords"])
    assert_tampered(*check(model, copy, capsys), "cold.0 is", "needs")


def test_wrong_dtype_coords(model: Path, copy: Path) -> None:
    layer, file = coords_of(copy)
    tensors = load_file(str(file))
    tensors["null.1"] = tensors["null.1"].double()
    save_file(tensors, str(file))
    sign(copy, layer["coords"])
    with pytest.raises(BaselineError, match=r"null\.1 is F64"):
        load_baseline(copy)


def test_nan_coords(
    model: Path, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header is right; the values are checked when compare_plan reads them — for a
    layer it refits: a layer bit-equal to the baseline's is not refitted, and its coordinates
    are not read (so the checked copy moves every weight a little)."""
    from experiments.derived import derive, noise

    layer, file = coords_of(copy)
    tensors = load_file(str(file))
    tensors["null.1"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"dynaudit.layer": layer["name"]})
    sign(copy, layer["coords"])
    load_baseline(copy)  # the header is valid
    moved = derive(model, tmp_path / "moved", noise(0.01))
    assert_tampered(*check(moved, copy, capsys), "null.1 holds NaN or Inf", file.name)


def test_an_extra_seed_in_a_coordinate_file(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layer, file = coords_of(copy)
    tensors = load_file(str(file))
    tensors["cold.2"], tensors["null.2"] = tensors["cold.1"].clone(), tensors["null.1"].clone()
    save_file(tensors, str(file), metadata={"dynaudit.layer": layer["name"]})
    sign(copy, layer["coords"])
    assert_tampered(*check(model, copy, capsys), "'cold.2'", "2-seed")


def test_a_missing_seed_in_a_coordinate_file(model: Path, copy: Path) -> None:
    layer, file = coords_of(copy)
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.endswith(".1")}
    save_file(tensors, str(file))
    sign(copy, layer["coords"])
    with pytest.raises(BaselineError, match=r"lacks cold\.1"):
        load_baseline(copy)


def test_a_coordinate_file_that_is_not_safetensors(model: Path, copy: Path) -> None:
    layer, file = coords_of(copy)
    file.write_bytes(b"\xff" * 8 + b"not a header")
    sign(copy, layer["coords"])
    with pytest.raises(BaselineError, match="tampered or corrupt"):
        load_baseline(copy)


def _nan_distance(data: dict[str, Any]) -> None:
    next(x for x in data["layers"] if x["coords"])["null_mean_distance"][0] = float("nan")


def _inf_scale(data: dict[str, Any]) -> None:
    next(x for x in data["layers"] if x["coords"])["scale"] = float("inf")


def _short_distances(data: dict[str, Any]) -> None:
    next(x for x in data["layers"] if x["coords"])["cold_mean_distance"].pop()


def _seeds(data: dict[str, Any]) -> None:
    data["seeds"] = 3


def _nan_in_report(data: dict[str, Any]) -> None:
    data["report"]["seconds"] = float("nan")


def _huge_number(data: dict[str, Any]) -> None:
    data["layers"][0]["scale"] = "HUGE"  # replaced by 1e999 in the text below


def _bad_settings(data: dict[str, Any]) -> None:
    data["settings"]["pieces"] = 3


def _negative_shape(data: dict[str, Any]) -> None:
    next(x for x in data["layers"] if x["coords"])["shape"] = [1, -32, 32]


def _bad_digest(data: dict[str, Any]) -> None:
    next(x for x in data["layers"] if x["coords"])["digest"] = "not a sha256"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_nan_distance, "holds NaN"),
        (_inf_scale, "holds Infinity"),
        (_nan_in_report, "holds NaN"),
        (_huge_number, "1e999, not a finite number"),
        (_short_distances, "1 cold and 2 null"),
        (_seeds, "seeds 3"),
        (_bad_settings, "invalid fit settings"),
        (_negative_shape, "not (g, m, n)"),
        (_bad_digest, "'not a sha256' is not a sha256"),
    ],
)
def test_numbers_in_baseline_json(
    model: Path,
    copy: Path,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[dict[str, Any]], None],
    needle: str,
) -> None:
    """Python's json writes and reads NaN and Infinity, and pydantic takes them: exit 3."""
    edit_json(copy, change)
    if change is _huge_number:
        text = (copy / "baseline.json").read_text().replace('"HUGE"', "1e999")
        (copy / "baseline.json").write_text(text)
        sign(copy, "baseline.json")
    assert_tampered(*check(model, copy, capsys), needle, "baseline.json")


def test_a_newer_format_is_refused_by_its_version(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def newer(data: dict[str, Any]) -> None:
        data["format_version"] = BASELINE_FORMAT + 1
        data["a_field_from_the_future"] = {"x": 1}

    edit_json(copy, newer)
    code, err = check(model, copy, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert (
        f"baseline format {BASELINE_FORMAT + 1} is newer than this dynaudit "
        f"(reads {BASELINE_FORMAT})" in err
    ), err
    assert "upgrade dynaudit" in err and "not a valid baseline" not in err


def test_a_newer_format_is_named_even_with_a_manifest_of_another_layout(
    copy: Path,
) -> None:
    edit_json(copy, lambda d: d.update(format_version=7))
    (copy / "manifest.json").write_text(json.dumps({"version": 2, "files": []}))
    with pytest.raises(BaselineError, match="baseline format 7 is newer"):
        load_baseline(copy)


def test_a_newer_protocol_is_refused_by_its_version(copy: Path) -> None:
    edit_json(copy, lambda d: d.update(protocol_version=PROTOCOL_VERSION + 1))
    with pytest.raises(BaselineError, match=f"protocol v{PROTOCOL_VERSION + 1} is newer"):
        load_baseline(copy)


def test_a_baseline_of_the_previous_protocol_asks_to_be_re_created(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """v2 baselines (H = 8, 400 steps) hold numbers v3 does not compute: exit 3, one line."""
    edit_json(copy, lambda d: d.update(protocol_version=PROTOCOL_VERSION - 1))
    code, err = check(model, copy, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert f"made with protocol v{PROTOCOL_VERSION - 1}" in err, err
    assert "re-create the baseline" in err, err


def test_a_baseline_without_format_version_still_loads(copy: Path) -> None:
    """Baselines written before the field was documented default to format 1."""
    edit_json(copy, lambda d: d.pop("format_version"))
    assert load_baseline(copy).format_version == 1


def _with_deadline(call: Callable[[], Any], fifo: Path, seconds: float = 5.0) -> Any:
    """Run ``call`` in a thread; fail (rather than hang the suite) if it blocks."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():  # unblock the reader (a writer that opens and closes) and fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"blocked for more than {seconds} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.skipif(sys.platform == "win32", reason="no FIFOs")
@pytest.mark.parametrize("which", ["manifest.json", "baseline.json", "coords", "unlisted"])
def test_a_fifo_in_a_baseline_dir_does_not_hang(
    model: Path, copy: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    if which == "coords":
        _, path = coords_of(copy)
    elif which == "unlisted":
        path = copy / "coords" / "99999.safetensors"
    else:
        path = copy / which
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    started = time.monotonic()
    code, err = _with_deadline(lambda: check(model, copy, capsys), path)
    assert time.monotonic() - started < 5
    assert_tampered(code, err, which if which != "unlisted" else "99999.safetensors")


@pytest.mark.skipif(sys.platform == "win32", reason="no FIFOs")
def test_a_symlink_to_a_fifo_as_coords_does_not_hang(copy: Path, tmp_path: Path) -> None:
    _, path = coords_of(copy)
    fifo = copy / "coords" / ".pipe"
    os.mkfifo(fifo)
    path.unlink()
    path.symlink_to(fifo)
    with pytest.raises(BaselineError, match="not a regular file"):
        _with_deadline(lambda: load_baseline(copy), fifo)


# -- stale staging directories -----------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    for item in [path, *path.rglob("*")]:
        os.utime(item, (when, when), follow_symlinks=False)


def test_stale_baseline_staging_is_swept_on_the_next_baseline(model: Path, tmp_path: Path) -> None:
    """What a killed `baseline` left beside --out: swept after a day, not before; nothing
    that is not dynaudit's own staging name is touched."""
    parent = tmp_path / "baselines"
    stale = parent / f".old.tmp-{uuid.uuid4().hex}"
    fresh = parent / f".busy.tmp-{uuid.uuid4().hex}"
    for staging in (stale, fresh):
        (staging / "coords").mkdir(parents=True)
        (staging / "coords" / "00000.safetensors").write_bytes(b"partial")
    lookalikes = [parent / ".old.tmp-notahexid", parent / f"old.tmp-{uuid.uuid4().hex}"]
    for other in lookalikes:
        other.mkdir()
    notes = parent / "notes.txt"
    notes.write_text("mine\n")
    for path in [stale, *lookalikes, notes]:
        _age(path, 2 * DAY)
    _age(fresh, DAY - 3600)  # a long run: its directory is old, its coords/ just changed
    os.utime(fresh, (time.time() - 3 * DAY, time.time() - 3 * DAY))
    dynaudit.baseline(model, parent / "new", **FIT)
    assert not stale.exists()
    assert fresh.is_dir() and (fresh / "coords" / "00000.safetensors").is_file()
    assert all(other.is_dir() for other in lookalikes) and notes.read_text() == "mine\n"
    assert load_baseline(parent / "new").seeds == FIT["seeds"]


def test_stale_cache_staging_is_swept_on_the_next_cache_write(model: Path, tmp_path: Path) -> None:
    from dynaudit.cache import ResultCache, cache_root
    from dynaudit.schema import Report

    dynaudit.measure(model, q_dim=16, pieces=4, steps=30)
    (entry,) = (cache_root() / "results").glob("*/*")
    report = Report.model_validate_json((entry / "report.json").read_bytes())
    folder = entry.parent
    stale, fresh, trash = (
        folder / f".{kind}-{uuid.uuid4().hex}" for kind in ("tmp", "tmp", "trash")
    )
    for directory in (stale, fresh, trash):
        directory.mkdir()
        (directory / "report.json").write_text("{")
    _age(stale, 2 * DAY)
    _age(trash, 2 * DAY)
    memo = cache_root() / "hashes" / f".tmp-{uuid.uuid4().hex}"
    memo.write_text("half a hash")
    _age(memo, 2 * DAY)
    # The next entry written into the same folder (a key sharing the first two hex digits).
    ResultCache(cache_root()).store(folder.name + "0" * 62, report)
    assert not stale.exists() and not trash.exists()
    assert fresh.is_dir()
    (model / "extra.safetensors").write_bytes(b"")  # a file never hashed before
    try:
        ResultCache(cache_root()).digest(model / "extra.safetensors")
    finally:
        (model / "extra.safetensors").unlink()
    assert not memo.exists()
