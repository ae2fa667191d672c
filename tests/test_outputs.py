"""Outputs never touch inputs, and an output that cannot be written is one line and an honest
exit code (issue 18, SPEC §8): 2 for a path that must not or cannot be an output, 3 for the
environment (permissions, a full disk), never 4; nothing is written when a run is refused."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynaudit.cli import main
from tests.producers import save_module

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and the set of names: nothing added or removed)."""
    found: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, code: int, expected: int, *needles: str) -> None:
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def tiny(out: Path) -> Path:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return save_module(module, out, {"model_type": "mlp"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the tests of this module, which check that none of them changes it."""
    return tiny(tmp_path_factory.mktemp("outputs") / "ckpt")


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two healthy shards and their index, no ``model.safetensors``."""
    out = tmp_path / "sharded"
    out.mkdir()
    torch.manual_seed(1)
    weight_map = {}
    for i in range(2):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({f"layers.{i}.weight": torch.randn(24, 24)}, str(out / name))
        weight_map[f"layers.{i}.weight"] = name
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def baseline_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real baseline of ``checkpoint`` made by `dynaudit baseline` at tiny settings."""
    work = tmp_path_factory.mktemp("baseline")
    out = work / "bl"
    code = main(["baseline", str(checkpoint), "--out", str(out), *FAST, "--seeds", "1",
                 "--cache-dir", str(work / "cache")])  # fmt: skip
    assert code == 0
    return out


# -- outputs never touch inputs ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["model.safetensors", "config.json", "link-to-weights", "hard-link", "."]
)
def test_measure_never_writes_over_the_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Regression: `measure X --json X/model.safetensors` exited 0 and the weights became JSON.
    A symlink or a hard link elsewhere to a weight file is the same file."""
    if name == "link-to-weights":
        out = tmp_path / "report.json"
        out.symlink_to(checkpoint / "model.safetensors")
    elif name == "hard-link":
        out = tmp_path / "report.json"
        os.link(checkpoint / "model.safetensors", out)
    else:
        out = checkpoint / name
    before = snapshot(checkpoint)
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(out))
    one_line(err, code, 2, str(out), str(checkpoint), "input")
    assert snapshot(checkpoint) == before


def test_no_new_weight_file_beside_shards(
    sharded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new model.safetensors beside healthy shards is what transformers would load next."""
    before = snapshot(sharded)
    for flag in ("--json", "--markdown"):
        out = sharded / "model.safetensors"
        code, _, err = cli(capsys, "measure", str(sharded), *FAST, flag, str(out))
        one_line(err, code, 2, flag, str(out))
    assert snapshot(sharded) == before
    # a report of another name in the checkpoint's directory is not an input
    code, _, err = cli(capsys, "measure", str(sharded), *FAST, "--json", str(sharded / "r.json"))
    assert code == 0, err
    assert json.loads((sharded / "r.json").read_text())["schema_version"] == 1


def test_the_base_of_an_adapter_is_an_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(checkpoint), "r": 2,
              "lora_alpha": 4, "target_modules": ["0"]}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"base_model.model.0.lora_A.weight": torch.randn(2, 16),
         "base_model.model.0.lora_B.weight": torch.zeros(32, 2)},
        str(adapter / "adapter_model.safetensors"),
    )  # fmt: skip
    before = snapshot(checkpoint, adapter)
    for out in (checkpoint / "model.safetensors", adapter / "adapter_model.safetensors"):
        code, _, err = cli(capsys, "measure", str(adapter), *FAST, "--json", str(out))
        one_line(err, code, 2, str(out))
    assert snapshot(checkpoint, adapter) == before


def test_check_never_writes_into_its_baseline(
    checkpoint: Path, baseline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `check M --baseline BL --json BL/baseline.json` destroyed the baseline, which
    got around "baselines are never overwritten". Nothing may be added inside it either."""
    before = snapshot(baseline_dir)
    for flag, name in (("--json", "baseline.json"), ("--markdown", "manifest.json"),
                       ("--junit", "extra.xml")):  # fmt: skip
        out = baseline_dir / name
        code, _, err = cli(
            capsys, "check", str(checkpoint), "--baseline", str(baseline_dir), flag, str(out)
        )
        one_line(err, code, 2, flag, str(out), str(baseline_dir))
    assert snapshot(baseline_dir) == before
    code, _, err = cli(
        capsys, "check", str(checkpoint), "--baseline", str(baseline_dir),
        "--json", str(tmp_path / "check.json"), "--quiet",
    )  # fmt: skip
    assert code == 0, err


def test_baseline_out_is_not_a_checkpoint_file(
    sharded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(sharded)
    out = sharded / "model.safetensors"
    code, _, err = cli(capsys, "baseline", str(sharded), "--out", str(out), *FAST)
    one_line(err, code, 2, "--out", str(out))
    assert snapshot(sharded) == before and not out.exists()


def test_plot_never_writes_over_its_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    """Regression: `plot a.json b.json --out a.json` replaced a report with a PNG."""
    reports = []
    for seed in ("0", "1"):
        path = tmp_path / f"step{seed}.json"
        code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--seed", seed,
                           "--json", str(path), "--quiet")  # fmt: skip
        assert code == 0, err
        reports.append(path)
    before = snapshot(*reports)
    code, _, err = cli(capsys, "plot", *map(str, reports), "--out", str(reports[0]))
    one_line(err, code, 2, "--out", str(reports[0]))
    assert snapshot(*reports) == before


def test_demo_refuses_a_directory_it_did_not_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `demo --out DIR` replaced an existing checkpoint's weights and config."""
    checkpoint = tiny(tmp_path / "ckpt")
    (checkpoint / "notes.txt").write_text("mine")
    before = snapshot(checkpoint)
    code, _, err = cli(capsys, "demo", "--out", str(checkpoint))
    one_line(err, code, 2, "--out", str(checkpoint), "not empty")
    assert snapshot(checkpoint) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _, err = cli(capsys, "demo", "--out", str(a_file))
    one_line(err, code, 2, str(a_file))
    assert a_file.read_text() == "mine"


def test_demo_builds_into_an_empty_or_its_own_directory(tmp_path: Path) -> None:
    from dynaudit.demo import build_demo_checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    build_demo_checkpoint(empty, steps=5)
    first = snapshot(empty)
    build_demo_checkpoint(empty, steps=5, seed=1)  # its own: rebuilt
    assert set(snapshot(empty)) == set(first) and snapshot(empty) != first
    build_demo_checkpoint(tmp_path / "new" / "demo", steps=5)
    assert (tmp_path / "new" / "demo" / "model.safetensors").is_file()


def test_two_outputs_to_one_path(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `--json X --markdown X` exited 0 and kept only one of them."""
    out = tmp_path / "x"
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(out),
                       "--markdown", str(out))  # fmt: skip
    one_line(err, code, 2, "--json", "--markdown", str(out))
    assert not out.exists()
    existing = tmp_path / "y.json"
    existing.write_text("kept")
    os.link(existing, tmp_path / "z.md")
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(existing),
                       "--markdown", str(tmp_path / "z.md"))  # fmt: skip
    one_line(err, code, 2, "same path")
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", "-",
                       "--markdown", "-")  # fmt: skip
    one_line(err, code, 2, "same path")
    assert existing.read_text() == "kept"


# -- what a write may replace, and how it fails ------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    yield path


def test_an_output_that_cannot_be_a_file_is_exit_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a directory, or a path below a file, for --json/--markdown was exit 4 after
    the whole run; a socket (or a symlink to one) would have been replaced by a file."""
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    sock = tmp_path / "s.json"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    link = tmp_path / "link.json"
    link.symlink_to(sock)
    cases = {
        "--json": [a_dir, a_file / "r.json", sock, link],
        "--markdown": [a_dir, a_file / "r.md"],
    }
    try:
        for flag, paths in cases.items():
            for out in paths:
                code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, flag, str(out))
                one_line(err, code, 2, flag, str(out))
    finally:
        listener.close()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode) and link.is_symlink()
    assert a_file.read_text() == "mine" and not any(a_dir.iterdir())
    code, _, err = cli(capsys, "plot", str(a_file), "--out", str(a_dir))
    one_line(err, code, 2, "--out", str(a_dir))
    code, _, err = cli(capsys, "baseline", str(checkpoint), "--out", str(a_file / "bl"), *FAST)
    one_line(err, code, 2, "--out", str(a_file))


def test_a_fifo_with_a_reader_receives_the_report(
    checkpoint: Path, fifo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FIFO (``--json >(jq .)``) is written into, not replaced; it stays a FIFO."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    time.sleep(0.2)  # the reader opens the FIFO first, as a shell's process substitution does
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(fifo), "-q")
    reader.join(timeout=60)
    assert code == 0, err
    assert "layers" in json.loads(got[0])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_fifo_nobody_reads_is_exit_3_not_a_hang(checkpoint: Path, fifo: Path) -> None:
    """Opening a FIFO for writing waits for a reader: without one it was a hang."""
    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "inspect", str(checkpoint), "--json", str(fifo)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    one_line(proc.stderr, proc.returncode, 3, str(fifo), "no process is reading")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dev_stdout_redirected_to_a_file_appends_to_it(checkpoint: Path, tmp_path: Path) -> None:
    """Regression: with stdout redirected to a file (``>> log``), ``--json /dev/stdout``
    followed the link to that file and renamed a report over it: what the file held was lost.
    It is stdout: written through the descriptor, the shell's append kept."""
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    before = log.stat().st_ino
    with open(log, "a") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "dynaudit", "inspect", str(checkpoint), "--json", "/dev/stdout"],
            stdout=out, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("earlier\n{") and "layers" in json.loads(text.split("\n", 1)[1])
    assert log.stat().st_ino == before
    err = tmp_path / "err.txt"
    with open(err, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "dynaudit", "inspect", str(checkpoint), "--json", "/dev/stderr"],
            stdout=subprocess.PIPE, stderr=out, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2 and "open file descriptor" in err.read_text()


def test_the_null_device_is_written_into_and_other_devices_are_refused(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/dev/null takes a report it discards; /dev/full (any device but the null one, where a
    write could do harm) is refused before the run and stays a device."""
    code, _, err = cli(capsys, "inspect", str(checkpoint), "--json", os.devnull)
    assert code == 0, err
    code, _, err = cli(capsys, "inspect", str(checkpoint), "--json", "/dev/full")
    one_line(err, code, 2, "/dev/full", "never replaced")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_dev_stdout_is_standard_output(checkpoint: Path) -> None:
    """Regression: as root, ``--json /dev/stdout`` replaced the /dev/stdout symlink with a
    regular file and nothing reached stdout. It is stdout: the report, and no table."""
    before = os.lstat("/dev/stdout")
    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "measure", str(checkpoint), *FAST, "--json",
         "/dev/stdout"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "layers" in json.loads(proc.stdout)
    after = os.lstat("/dev/stdout")
    assert stat.S_ISLNK(after.st_mode) and after.st_ino == before.st_ino


def test_an_unwritable_directory_is_exit_3(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a read-only destination was exit 4 ("a bug in dynaudit")."""
    if ROOT:  # root writes through permission bits: sysfs refuses new files even to root
        locked = Path("/sys/kernel")
        if not locked.is_dir():
            pytest.skip("needs a directory this process cannot write in")
    else:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
    for flag in ("--json", "--markdown"):
        out = locked / "dynaudit-report"
        code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, flag, str(out), "--quiet")
        one_line(err, code, 3, str(out))
    code, _, err = cli(capsys, "baseline", str(checkpoint), "--out", str(locked / "bl"), *FAST)
    one_line(err, code, 3, str(locked))


def test_a_full_disk_is_exit_3_and_leaves_no_debris(checkpoint: Path, tmp_path: Path) -> None:
    """A write that runs out of room (here the file-size limit: EFBIG, as ENOSPC would) is one
    line, exit 3, and leaves neither a partial report nor its temporary file."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    out = tmp_path / "reports" / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit", "measure", str(checkpoint), *FAST, "--no-cache",
         "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
        env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_reports_respect_the_umask_and_keep_a_files_mode(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: reports were created 0600 whatever the umask (mkstemp's mode)."""
    kept = tmp_path / "kept.md"
    kept.write_text("old")
    kept.chmod(0o604)
    previous = os.umask(0o027)
    try:
        new = tmp_path / "new.json"
        code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(new),
                           "--markdown", str(kept), "--quiet")  # fmt: skip
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() != "old"


def test_a_symlink_to_a_report_is_written_through(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "reports" / "latest.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    code, _, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", str(link), "--quiet")
    assert code == 0, err
    assert link.is_symlink() and json.loads(target.read_text())["schema_version"] == 1


def test_dash_is_standard_output(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SPEC §8: every report flag takes a PATH, and `-` means stdout (no table mixed in)."""
    code, out, err = cli(capsys, "measure", str(checkpoint), *FAST, "--json", "-")
    assert code == 0, err
    assert json.loads(out)["schema_version"] == 1 and not Path("-").exists()
    code, out, err = cli(capsys, "measure", str(checkpoint), *FAST, "--markdown", "-")
    assert code == 0, err
    assert out.lstrip().startswith("#") and "┏" not in out


# -- plot --method ------------------------------------------------------------------------


def test_plot_refuses_an_unknown_method(
    baseline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `plot --method bogus` exited 0 and drew PCA titled "BOGUS"."""
    out = tmp_path / "map.png"
    code, _, err = cli(capsys, "plot", str(baseline_dir), "--method", "bogus", "--out", str(out))
    one_line(err, code, 2, "bogus", "pca", "tsne")
    assert not out.exists()
    code, _, err = cli(capsys, "plot", str(baseline_dir), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG")
